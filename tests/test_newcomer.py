"""A newcomer's first hour: every mistake seen when trying the README gets one line and
a non-zero exit, or a sensible behaviour; a finished run says so and a new one can
start; stopping things is quiet."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import subprocess
import threading
import time

import numpy as np
import pytest
import requests

from edgefl import wire
from edgefl.app import flags
from edgefl.app.launcher import edgefl_command, start_logged, stop_process, wait_for_server
from tests.api_helpers import SPEC, build_coordinator, register, take_task, update_body, upload


def edgefl(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(edgefl_command(*args), capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def one_line_error(result: subprocess.CompletedProcess, code: int = 1) -> str:
    assert result.returncode == code, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "error" in lines[0] and "Traceback" not in result.stderr + result.stdout, result.stderr
    return lines[0]


def numeric_flags() -> list[tuple[str, str, str]]:
    """(command, flag, a value outside its range) for every bounded numeric flag."""
    _, commands = flags.build_parser()
    cases = []
    for name, parser in commands.items():
        for action in parser._actions:
            rule = getattr(action.type, "rule", None)
            if rule is None:
                continue
            outside = rule.high + 1 if rule.high is not None else rule.low - 1
            cases.append((name, action.option_strings[0], str(action.type.kind(outside))))
    return cases


@pytest.mark.parametrize("command, flag, value", numeric_flags())
def test_every_numeric_flag_is_checked_against_its_range(command, flag, value, capsys):
    with pytest.raises(SystemExit) as exit:
        flags.parse([command, flag, value])
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit.value.code == 2 and len(lines) == 1
    assert lines[0].startswith(f"edgefl {command}: error: argument {flag}") and "must be" in lines[0]


def test_the_range_checks_cover_the_flags_newcomers_tripped_on():
    covered = {(command, flag) for command, flag, _ in numeric_flags()}
    assert {
        ("serve", "--port"),
        ("serve", "--threads"),
        ("serve", "--workers"),
        ("serve", "--round-timeout"),
        ("serve", "--rounds"),
        ("devices", "--count"),
        ("devices", "--threads"),
        ("export", "--train-batch"),
    } <= covered
    assert one_line_error(edgefl("serve", "--port", "70000"), code=2).endswith(
        "must be at least 0 and at most 65535 (see 'edgefl serve --help')"
    )


def test_a_subcommands_bad_flag_is_its_own_error_and_there_is_a_version():
    assert one_line_error(edgefl("serve", "--no-such-flag"), code=2).startswith(
        "edgefl serve: error: unrecognized arguments: --no-such-flag"
    )
    assert one_line_error(edgefl("status", "--json", "extra"), code=2).startswith("edgefl status: error:")
    version = edgefl("--version")
    assert version.returncode == 0 and version.stdout.startswith("edgefl ")


def test_configuration_errors_name_the_flags():
    line = one_line_error(edgefl("serve", "--min-reports", "9", "--target-reports", "3"))
    assert "--min-reports must not exceed --target-reports" in line and "min_reports" not in line


def test_export_out_that_is_a_file_or_unwritable_is_one_line(tmp_path):
    checkpoint = tmp_path / "model.safetensors"
    checkpoint.write_bytes(b"not read: the output is checked first")
    existing = tmp_path / "a-file"
    existing.write_text("keep me")
    line = one_line_error(edgefl("export", "--checkpoint", str(checkpoint), "--model", "cnn_small", "--out", str(existing)))
    assert "--out" in line and "not a directory" in line and existing.read_text() == "keep me"
    line = one_line_error(
        edgefl("export", "--checkpoint", str(checkpoint), "--model", "cnn_small", "--out", str(existing / "below"))
    )
    assert "cannot write into --out" in line
    line = one_line_error(
        edgefl("export", "--checkpoint", str(checkpoint), "--model", "cnn_small", "--out", "/proc/edgefl-export")
    )
    assert "cannot write into --out /proc/edgefl-export" in line


def test_logs_show_only_edgefls_own_lines_unless_asked():
    from edgefl import logs

    def shown(level: str) -> list[str]:
        import io

        stream = io.StringIO()
        logs.configure(level, stream=stream)
        for name in ("tensorflow", "absl", "waitress", "edgefl.coordinator"):
            logging.getLogger(name).warning("from %s", name)
            logging.getLogger(name).info("info from %s", name)
        return stream.getvalue().splitlines()

    try:
        default = shown("info")
        assert [line.split(" ", 2)[2].split("[")[0] for line in default] == ["edgefl.coordinator"] * 2
        assert len(shown("debug")) == 8
        assert len(shown("warning")) == 1
    finally:
        logs.configure("info")


@pytest.fixture(scope="module")
def finished_template(tmp_path_factory, small_parts):
    """An instance directory whose one-round run of cnn_small has finished (built once;
    each test gets its own copy, ``finished_instance``)."""
    from edgefl.config import RunConfig

    path = tmp_path_factory.mktemp("finished") / "instance"
    config = RunConfig(model="cnn_small", rounds=1, target_reports=1, min_reports=1)
    app, driver = build_coordinator(path, small_parts, config)
    client = app.test_client()
    assert driver.step()
    headers = register(client)
    assert upload(client, headers, take_task(client, headers)["round_id"], update_body()).status_code == 202
    while driver.step():
        pass
    status = client.get("/v1/status").json
    assert status["run"]["status"] == "finished"
    driver.release_lease()
    final = app.extensions["edgefl.store"].blobs.get(status["model"]["sha256"])
    return path, status, final


@pytest.fixture
def finished_instance(finished_template, tmp_path):
    """A copy of the finished instance for one test, which may change it at will."""
    import shutil

    template, status, final = finished_template
    path = tmp_path / "instance"
    shutil.copytree(template, path)
    return path, status, final


def serve(instance, log, *flags):
    server = start_logged(edgefl_command("serve", "--instance", str(instance), "--port", "0", "--no-publish", *flags), log)
    return server, wait_for_server(instance, server, log)


@pytest.mark.slow
def test_serving_a_finished_run_says_so_and_devices_say_why_they_stop(finished_instance, tmp_path):
    instance, _, _ = finished_instance
    log = tmp_path / "serve.log"
    server, url = serve(instance, log)
    try:
        assert "is finished; serving its model and record" in log.read_text() and "--new-run" in log.read_text()
        fleet = edgefl("devices", "--coordinator", url, "--count", "2", "--log-dir", str(tmp_path / "devices"))
        assert fleet.returncode == 0, fleet.stderr
        assert fleet.stdout.count("(stopped: the run is finished)") == 2
        assert "edgefl serve --new-run" in fleet.stdout
        running = edgefl("serve", "--instance", str(instance), "--port", "0", "--new-run")
        assert "another coordinator" in one_line_error(running)  # this one holds the instance
    finally:
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=30) == 0
    assert "Traceback" not in log.read_text()
    assert one_line_error(edgefl("serve", "--instance", str(instance), "--from-final")).endswith("give --new-run too")


@pytest.mark.slow
def test_a_new_run_starts_from_the_final_model_and_stops_quietly(finished_instance, tmp_path):
    """``--new-run --from-final`` keeps the old run's record and starts from its model.
    Then: SIGINT on ``edgefl devices`` says so and exits 130; SIGTERM on ``serve`` while
    a check-in is held stops it cleanly, without a traceback."""
    instance, finished, final = finished_instance
    log = tmp_path / "serve.log"
    server, url = serve(
        instance,
        log,
        "--new-run",
        "--from-final",
        "--model",
        "cnn_small",
        "--rounds",
        "2",
        "--target-reports",
        "2",
        "--min-reports",
        "1",
    )
    try:
        status = requests.get(f"{url}/v1/status", timeout=10).json()
        assert status["run"]["status"] == "running" and status["run"]["config"]["rounds"] == 2
        first, _ = wire.decode(requests.get(f"{url}{status['model']['url']}", timeout=10).content, SPEC)
        previous, _ = wire.decode(final, SPEC)
        assert all(np.array_equal(a, b) for a, b in zip(first, previous))
        (record,) = (instance / "previous-runs").glob("run-*.json")
        kept = json.loads(record.read_text())
        assert kept["final_model"]["sha256"] == finished["model"]["sha256"] and kept["rounds"][0]["status"] == "committed"
        assert one_line_error(edgefl("serve", "--instance", str(instance), "--port", "0", "--new-run")).count("running run")

        fleet = subprocess.Popen(
            edgefl_command("devices", "--coordinator", url, "--count", "1", "--log-dir", str(tmp_path / "devices")),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            stdin=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 60
        while not list((tmp_path / "devices").glob("device-*.log")) and time.monotonic() < deadline:
            time.sleep(0.1)
        fleet.send_signal(signal.SIGINT)
        out, err = fleet.communicate(timeout=60)
        assert fleet.returncode == 130 and err.strip().endswith("interrupted; everything it started has been stopped"), err

        device = requests.post(f"{url}/v1/devices", timeout=10).json()
        headers = {"Authorization": f"Bearer {device['token']}"}
        deadline = time.monotonic() + 30
        while (answer := requests.post(f"{url}/v1/checkin", headers=headers, timeout=15).json())["status"] != "task":
            assert time.monotonic() < deadline, answer
            time.sleep(answer["retry_after"])
        body = update_body()
        sent = requests.post(
            f"{url}/v1/rounds/{answer['task']['round_id']}/updates",
            data=body,
            headers={**headers, "Content-Type": "application/octet-stream"},
            timeout=30,
        )
        assert sent.status_code == 202  # one of the two reports the round waits for: this device waits in the lobby
        held: dict = {}
        waiting = threading.Thread(
            target=lambda: held.update(answer=requests.post(f"{url}/v1/checkin", headers=headers, timeout=30))
        )
        waiting.start()
        waiting.join(timeout=1.0)
        assert waiting.is_alive()  # held in the lobby: an unheld check-in is answered in milliseconds
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=30) == 0
        waiting.join(timeout=30)
        assert held["answer"].status_code == 200
    finally:
        stop_process(server)
    text = log.read_text()
    assert "Traceback" not in text and "Bad file descriptor" not in text, text[-2000:]


def test_a_non_number_is_reported_plainly():
    """``bounded`` types carry their kind's name, which argparse shows for a non-number."""
    with pytest.raises(argparse.ArgumentTypeError, match="not a whole number"):
        flags.bounded(int, 0, 10)("ten")
