"""The edgefl command as a user meets it: help, and one-line errors with non-zero exits."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest


def edgefl(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "edgefl", *args], capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
    )


def closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def assert_one_line_error(result: subprocess.CompletedProcess, *, contains: str, code: int = 1):
    assert result.returncode == code, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "error" in lines[0] and contains in lines[0]
    assert "Traceback" not in result.stderr + result.stdout


@pytest.mark.parametrize("command", [[], ["serve"], ["devices"], ["export"], ["status"], ["demo"]])
def test_help(command):
    result = edgefl(*command, "--help")
    assert result.returncode == 0 and "usage: edgefl" in result.stdout


def test_bad_flag_is_one_line_and_exit_2():
    assert_one_line_error(edgefl("serve", "--no-such-flag"), contains="--no-such-flag", code=2)
    assert_one_line_error(edgefl("devices", "--count", "many"), contains="--count", code=2)


def test_bad_values_are_one_line():
    assert_one_line_error(edgefl("serve", "--model", "resnet", "--port", "0"), contains="--model must be cnn, cnn_small, lenet5")
    assert_one_line_error(edgefl("serve", "--model", "mine.py:build", "--port", "0"), contains="--model names no file")
    assert_one_line_error(edgefl("serve", "--dataset", "/no/such/data", "--port", "0"), contains="--dataset")
    assert_one_line_error(edgefl("devices", "--dataset", "mnist.zip"), contains="--dataset")
    assert_one_line_error(edgefl("devices", "--dataset", "digits", "--partition", "natural"), contains="natural")
    # The demo checks its data and partition before it starts anything.
    assert_one_line_error(edgefl("demo", "--partition", "natural+style"), contains="needs data with writers")
    assert_one_line_error(edgefl("demo", "--partition", "classes:20"), contains="classes:20 needs k <= 10")
    assert_one_line_error(
        edgefl("serve", "--min-reports", "5", "--target-reports", "2"), contains="--min-reports must not exceed --target-reports"
    )
    assert_one_line_error(edgefl("devices", "--partition", "dirichlet:-1"), contains="bad partition")
    assert_one_line_error(edgefl("devices", "--runtime", "keras,tpu"), contains="bad --runtime")
    assert_one_line_error(
        edgefl("serve", "--aggregator", "dp_adaptive", "--port", "0"),
        contains="--target-reports must be above 10 x --dp-noise-multiplier",
    )
    assert_one_line_error(
        edgefl("serve", "--aggregator", "median", "--port", "0"), contains="--aggregator: invalid choice", code=2
    )
    assert_one_line_error(edgefl("devices", "--holdout", "1"), contains="--holdout", code=2)
    assert_one_line_error(edgefl("export", "--variants", "int4"), contains="bad --variants")
    assert_one_line_error(edgefl("demo", "--runtime", "tflite"), contains="bad --runtime")


@pytest.mark.parametrize("command", [["status"], ["export"], ["devices", "--count", "1"]])
def test_unreachable_coordinator_is_one_line(command):
    result = edgefl(*command, "--coordinator", closed_port_url())
    assert_one_line_error(result, contains="unreachable")


def test_devices_get_ready_while_the_coordinator_is_awaited_and_stop_if_it_never_answers(tmp_path):
    """With --dataset given, the hosts start at once (held: nothing contacts the
    coordinator) while the fleet waits for the coordinator; when it never answers, the
    error is one line and no host is left behind."""
    import time

    import psutil

    started = time.monotonic()
    result = edgefl(
        "devices", "--count", "2", "--dataset", "digits", "--log-dir", str(tmp_path), "--wait-for-coordinator", "3",
        "--coordinator", closed_port_url(),
    )  # fmt: skip
    assert_one_line_error(result, contains="unreachable")
    assert 3 <= time.monotonic() - started
    assert (tmp_path / "device-0000.log").exists()  # the host had started
    survivors = [p for p in psutil.process_iter(["cmdline"]) if str(tmp_path) in " ".join(p.info["cmdline"] or [])]
    assert not survivors


@pytest.mark.parametrize(
    "url, says",
    [
        ("mysql://db/edgefl", "unsupported database URL"),
        ("sqlite://relative.db", "a SQLite URL names a file"),
        ("postgresql://edgefl@127.0.0.1:1/edgefl", "cannot connect to postgresql://edgefl@127.0.0.1:1/edgefl"),
    ],
)
def test_an_unusable_database_url_is_one_line(tmp_path, url, says):
    assert_one_line_error(edgefl("serve", "--instance", str(tmp_path / "instance"), "--port", "0", "--db", url), contains=says)


def test_missing_checkpoint_is_one_line(tmp_path):
    result = edgefl("export", "--checkpoint", str(tmp_path / "nope.safetensors"), "--out", str(tmp_path / "out"))
    assert_one_line_error(result, contains="no checkpoint file")
    assert not (tmp_path / "out").exists()


def test_checkpoint_of_another_model_is_one_line(tmp_path):
    import numpy as np

    from edgefl import wire

    path = tmp_path / "small.safetensors"
    path.write_bytes(wire.encode(["w"], [np.zeros(3, np.float32)]))
    result = edgefl("export", "--checkpoint", str(path), "--model", "cnn", "--out", str(tmp_path / "out"))
    assert_one_line_error(result, contains="does not fit model cnn")


def test_demo_refuses_to_replace_a_directory_it_did_not_write(tmp_path):
    precious = tmp_path / "precious.txt"
    precious.write_text("keep me")
    assert_one_line_error(edgefl("demo", "--out", str(tmp_path)), contains="not an earlier demo")
    assert precious.read_text() == "keep me"


@pytest.mark.parametrize("url", ["127.0.0.1:8080", "localhost", "ftp://127.0.0.1:8080", "http://", "http://127.0.0.1:99999"])
def test_a_coordinator_that_is_not_an_http_url_is_one_line(url):
    for command in ("status", "devices", "export"):
        assert_one_line_error(edgefl(command, "--coordinator", url), contains="--coordinator", code=2)


def test_impossible_partition_is_one_line_before_any_device_starts():
    """With --dataset given, before the coordinator is even asked (without it, the data
    is the run's, which the coordinator names)."""
    result = edgefl("devices", "--dataset", "digits", "--partition", "classes:11", "--coordinator", closed_port_url())
    assert_one_line_error(result, contains="classes:11")


@pytest.mark.parametrize(
    "content, says",
    [(None, "cannot read --admin-token-file"), ("short", "at least 16 characters"), (b"\xff" * 20, "cannot read")],
)
def test_a_bad_admin_token_file_is_one_line_before_serving(tmp_path, content, says):
    token_file = tmp_path / "admin-token"
    if isinstance(content, bytes):
        token_file.write_bytes(content)
    elif content is not None:
        token_file.write_text(content)
    result = edgefl("serve", "--instance", str(tmp_path / "instance"), "--port", "0", "--admin-token-file", str(token_file))
    assert_one_line_error(result, contains=says)
    assert not (tmp_path / "instance").exists()


def test_serve_refuses_flags_that_contradict_the_run_it_would_resume(tmp_path):
    import time
    from contextlib import closing

    from coordinator import rounds
    from coordinator.store import Store
    from edgefl.config import RunConfig

    store = Store(tmp_path / "instance")
    with closing(store.connect()) as db, store.transaction(db):
        rounds.start_run(db, RunConfig(model="cnn_small", rounds=3), "0" * 64, 1, "1" * 64, time.time())
    before = store.snapshot()
    result = edgefl("serve", "--instance", str(tmp_path / "instance"), "--port", "0", "--rounds", "5", "--model", "cnn_small")
    assert_one_line_error(result, contains="holds a run with rounds=3 (asked 5 by --rounds); leave those settings out")
    assert store.snapshot() == before
