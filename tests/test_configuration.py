"""One configuration: run settings declared once (edgefl.config) and read from a TOML
file, EDGEFL_* variables and flags (flags win), with the API's bodies derived from the
same declarations."""

from __future__ import annotations

import subprocess
import sys

import pytest

from edgefl.app.cli import CliError, run_config_from
from edgefl.app.flags import parse
from edgefl.config import RunConfig, env_name, run_settings


def edgefl(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "edgefl", *args], capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL, env=env
    )


def test_flags_win_over_variables_which_win_over_the_file(tmp_path, monkeypatch):
    path = tmp_path / "run.toml"
    path.write_text('[run]\nrounds = 7\nepochs = 3\nmodel = "cnn_small"\nclient_lr = 1\n')
    monkeypatch.setenv(env_name("epochs"), "4")
    monkeypatch.setenv(env_name("batch_size"), "32")
    config, given = run_config_from(parse(["serve", "--config", str(path), "--batch-size", "16"]))
    assert (config.rounds, config.epochs, config.batch_size, config.model, config.client_lr) == (7, 4, 16, "cnn_small", 1.0)
    assert given == {  # what a resumed run must agree with, and where each was given
        "rounds": f"rounds in {path}",
        "epochs": "EDGEFL_EPOCHS",
        "batch_size": "--batch-size",
        "model": f"model in {path}",
        "client_lr": f"client_lr in {path}",
    }
    assert config.target_reports == RunConfig().target_reports  # the rest: defaults


def test_a_file_may_hold_the_settings_at_its_top_level(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text("rounds = 2\n")
    assert run_config_from(parse(["serve", "--config", str(path)]))[0].rounds == 2


@pytest.mark.parametrize(
    ("content", "says"),
    [
        ("[run]\nrounds = 'x'\n", "rounds in {path} must be a whole number, not 'x'"),
        ("[run]\nrounds = true\n", "rounds in {path} must be a whole number, not True"),
        ("[run]\nrounds = 0\n", "rounds in {path} must be at least 1"),
        ("[run]\nroundz = 3\n", "roundz in {path}: there is no setting 'roundz'"),
        ("[run]\nmin_reports = 20\n", "min_reports in {path} must not exceed --target-reports"),
        ("[run\n", "{path} is not TOML"),
        ("[run]\n[devices]\ncount = 3\n", "only a [run] table is read, not devices"),
        ("[run]\naggregator = 'median'\n", "aggregator in {path} must be one of mean, robust"),
    ],
)
def test_a_bad_file_is_one_line_naming_the_file_and_setting(tmp_path, content, says):
    path = tmp_path / "run.toml"
    path.write_text(content)
    with pytest.raises(CliError) as raised:
        run_config_from(parse(["serve", "--config", str(path)]))
    assert says.format(path=path) in str(raised.value)


@pytest.mark.parametrize(
    ("variable", "value", "says"),
    [
        ("EDGEFL_ROUNDS", "many", "EDGEFL_ROUNDS must be a whole number"),
        ("EDGEFL_CLIENT_LR", "nan", "EDGEFL_CLIENT_LR must be a finite number"),
        ("EDGEFL_OVER_SELECTION", "0.5", "EDGEFL_OVER_SELECTION must be at least 1"),
    ],
)
def test_a_bad_variable_is_one_line_naming_it(monkeypatch, variable, value, says):
    monkeypatch.setenv(variable, value)
    with pytest.raises(CliError) as raised:
        run_config_from(parse(["serve"]))
    assert says in str(raised.value)


def test_the_command_says_it_in_one_line_and_changes_nothing(tmp_path):
    missing = edgefl("serve", "--instance", str(tmp_path / "instance"), "--config", str(tmp_path / "none.toml"))
    assert missing.returncode == 1 and missing.stderr.count("\n") == 1 and "cannot read" in missing.stderr
    assert "Traceback" not in missing.stderr and not (tmp_path / "instance").exists()


def test_a_resumed_run_refuses_a_file_that_contradicts_it(tmp_path):
    import time
    from contextlib import closing

    from coordinator import rounds
    from coordinator.store import Store

    store = Store(tmp_path / "instance")
    with closing(store.connect()) as db, store.transaction(db):
        rounds.start_run(db, RunConfig(model="cnn_small", rounds=3), "0" * 64, 1, "1" * 64, time.time())
    before = store.snapshot()
    path = tmp_path / "run.toml"
    path.write_text("[run]\nrounds = 5\nmodel = 'cnn_small'\n")
    result = edgefl("serve", "--instance", str(tmp_path / "instance"), "--port", "0", "--config", str(path))
    assert result.returncode == 1 and f"holds a run with rounds=3 (asked 5 by rounds in {path})" in result.stderr, result.stderr
    assert store.snapshot() == before


def test_the_api_bodies_are_the_declared_settings():
    """ConfigChange (a request) takes exactly the settings declared mutable, each with
    its declared bounds; RunConfigBody (an answer) all of them, unchecked, so a client
    reads a newer coordinator's settings too."""
    from edgefl.protocol import ConfigChange, RunConfigBody

    settings = {name: setting for name, _, setting in run_settings()}
    assert set(RunConfigBody.model_fields) == set(settings)
    assert set(ConfigChange.model_fields) == {name for name, s in settings.items() if s.mutable}
    schema = ConfigChange.model_json_schema()["properties"]
    for name, field in schema.items():
        s = settings[name]
        low = field.get("exclusiveMinimum" if s.above_low else "minimum")
        high = field.get("exclusiveMaximum" if s.below_high else "maximum")
        assert (low, high) == (s.low, s.high), name
    newer = {**RunConfig().__dict__, "aggregator": "secure", "rounds": 10**9}
    assert RunConfigBody.model_validate(newer).aggregator == "secure"


@pytest.mark.parametrize(
    ("settings", "problem"),
    [
        (dict(min_reports=1), "min_reports must be at least 2 for secure"),
        (dict(secagg_degree=5), "secagg_degree must be even"),
        (dict(min_reports=4, secagg_threshold=4), "secagg_threshold must not exceed the neighbours min_reports devices give"),
        (dict(min_reports=8, secagg_degree=2, secagg_threshold=3), "secagg_threshold must not exceed"),
    ],
)
def test_a_secure_run_needs_a_neighbour_graph_in_every_round_that_may_go_ahead(settings, problem):
    from edgefl.config import ConfigError

    with pytest.raises(ConfigError, match=problem):
        RunConfig(aggregator="secure", target_reports=10, **settings)
    RunConfig(aggregator="secure", target_reports=10, min_reports=4, secagg_threshold=3)  # 4 devices: 3 neighbours each
