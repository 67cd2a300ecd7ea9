"""End to end: the real coordinator and real device processes on 127.0.0.1.

Each test records every process it caused to exist (coordinator, devices, TFF's
worker_binary where one is used) while they run, and asserts afterwards that none of
them survives.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from contextlib import closing
from pathlib import Path

import psutil
import pytest
import requests

from edgefl.app.launcher import edgefl_command, federation, start_logged, stop_process, wait_for_server
from edgefl.config import RunConfig
from tests.processes import assert_all_gone, chromium, descendant_pids

pytestmark = pytest.mark.e2e


def assert_dashboard_draws(url: str, history: list[dict], out: Path) -> dict[int, str]:
    """The dashboard plots the status history's own numbers (each drawn point's record is
    read back from the chart library after it drew), and a screenshot is saved."""
    dom, started = chromium(url + "/", out, "--dump-dom")
    assert 'data-rendered="ok"' in dom and "data-error=" not in dom, dom[:2000]
    drawn = {(s, int(r)): v for s, r, v in re.findall(r'data-series="(\w+)" data-round="(\d+)" data-value="([^"]+)"', dom)}
    assert {r for _, r in drawn} == {h["round"] for h in history} and len(history) >= 2
    for h in history:
        assert drawn["accuracy", h["round"]] == f"{h['accuracy']:.4f}"
        assert drawn["loss", h["round"]] == f"{h['loss']:.4f}"
        for series in ("selected", "reported", "late", "dropped"):
            assert int(drawn[series, h["round"]]) == h[series]
        assert float(drawn["mb_down", h["round"]]) == pytest.approx(h["bytes_down"] / 1e6, abs=0.0006)
        assert float(drawn["mb_up", h["round"]]) == pytest.approx(h["bytes_up"] / 1e6, abs=0.0006)
        if h["upload_bits"]:
            assert float(drawn["mb_up_float32", h["round"]]) == pytest.approx(h["bytes_up_float32"] / 1e6, abs=0.0006)
        personal = h["personalization"]
        assert drawn["on_device_global", h["round"]] == f"{personal['global_accuracy']:.4f}"
        assert drawn["personalized", h["round"]] == f"{personal['personalized_accuracy']:.4f}"
    assert f"{len(history)}/{len(history)} rounds" in dom and "run finished" in dom

    screenshot = out / "dashboard.png"
    _, more = chromium(url + "/", out, f"--screenshot={screenshot}", "--window-size=1200,1400", "--hide-scrollbars")
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and screenshot.stat().st_size > 20_000
    return {**started, **more}


def test_real_processes_learn_export_and_leave_nothing(tmp_path):
    """A compressed run: the devices (Keras and LiteRT alike) upload 8-bit quantized deltas."""
    config = RunConfig(
        model="cnn_small",
        rounds=3,
        target_reports=4,
        min_reports=4,
        round_timeout_s=300,
        epochs=2,
        batch_size=10,
        client_lr=0.1,
        aggregator="compressed",
    )
    before = descendant_pids()
    seen: dict[int, str] = {}
    with federation(
        tmp_path, config, count=4, partition="dirichlet:0.5", data_seed=0, device_flags=["--runtime", "keras,litert"]
    ) as fed:
        seen.update(descendant_pids(before))
        status = fed.follow(lambda _entry: seen.update(descendant_pids(before)), timeout_s=600).model_dump(mode="json")
        seen.update(descendant_pids(before))
        assert fed.fleet.wait(timeout=60) == 0, (tmp_path / "logs" / "devices.log").read_text()
        exported = subprocess.run(
            edgefl_command("export", "--coordinator", fed.url, "--out", str(tmp_path / "tflite")),
            capture_output=True,
            text=True,
            timeout=300,
            stdin=subprocess.DEVNULL,
        )
        assert exported.returncode == 0, exported.stderr
        assert exported.stderr == "", exported.stderr  # no converter or LiteRT chatter unless --log-level debug
        shown = subprocess.run(
            edgefl_command("status", "--coordinator", fed.url),
            capture_output=True,
            text=True,
            timeout=60,
            stdin=subprocess.DEVNULL,
        )
        assert shown.returncode == 0, shown.stderr
        assert "run: finished, model cnn_small on digits, 3/3 rounds, 4 devices registered" in shown.stdout
        seen.update(assert_dashboard_draws(fed.url, status["history"], tmp_path))
        assert len([line for line in shown.stdout.splitlines() if line.strip().startswith(("1 ", "2 ", "3 "))]) == 3

    names = set(seen.values())
    assert "worker_binary" not in names, "the coordinator aggregates without TFF's worker process"
    assert sum(1 for n in seen.values() if n.startswith("python")) >= 1 + 1 + 4  # serve, fleet, devices
    assert_all_gone(seen)

    history = status["history"]
    assert [h["round"] for h in history] == [1, 2, 3]
    assert all(h["reported"] == 4 for h in history)
    assert history[-1]["accuracy"] > history[0]["accuracy"]
    assert history[-1]["accuracy"] > 0.5
    assert all(h["bytes_down"] > 0 for h in history)
    for h in history:  # 8 of 32 bits, with the bounds and headers
        assert h["upload_bits"] == 8 and 0.25 < h["bytes_up"] / h["bytes_up_float32"] < 0.26
    assert "MB up as float32" in shown.stdout
    # Every device reported its held-out accuracy before and after its local fine-tuning.
    for h in history:
        personal = h["personalization"]
        assert personal["devices"] == 4 and 0 < personal["examples"] < 360
        assert 0 <= personal["global_accuracy"] <= 1 and 0 <= personal["personalized_accuracy"] <= 1
    assert "personalised" in shown.stdout

    card = json.loads((tmp_path / "tflite" / "model_card.json").read_text())
    assert card["round"] == 3 and card["checkpoint_sha256"] == status["model"]["sha256"]
    assert {f["kind"] for f in card["files"]} == {"float32", "float16", "dynamic", "int8"}
    for f in card["files"]:
        assert f["top1_agreement"] >= 0.99, f
        assert (tmp_path / "tflite" / f["file"]).stat().st_size == f["bytes"]
    assert card["training"]["batch_size"] == config.batch_size and not card["training"]["custom_ops"]
    assert "cnn_small_int8.tflite" in exported.stdout and "builtin ops only: yes" in exported.stdout

    # A user sees edgefl's own lines: no TensorFlow, TFF, absl, waitress or LiteRT noise.
    for log in [tmp_path / "logs" / "coordinator.log", *(tmp_path / "logs" / "devices").glob("device-*.log")]:
        foreign = [
            line
            for line in log.read_text().splitlines()
            if not re.match(r"^\S+ \S+ edgefl[.\w]*\[\d+\] ", line) and not line.startswith("edgefl ")
        ]
        assert not foreign, (log.name, foreign[:5])

    # Devices upload deltas and counts, never examples: no device data on the coordinator.
    logs = (tmp_path / "logs" / "devices").glob("device-*.json")
    summaries = [json.loads(p.read_text()) for p in logs]
    assert len(summaries) == 4 and all(s["rounds_trained"] == 3 for s in summaries)
    assert sorted(s["runtime"] for s in summaries) == ["keras", "keras", "litert", "litert"]


def test_killing_the_owner_of_tffs_worker_takes_the_worker_with_it(tmp_path):
    """The TFF simulation in the benchmark owns a worker_binary; SIGKILL must not orphan it."""
    owner = start_logged(
        [
            sys.executable,
            "-c",
            "import time; from edgefl.app.tff_runtime import TffRuntime; r = TffRuntime(); "
            "r.start(); print('worker', r.pid, flush=True); time.sleep(600)",
        ],
        tmp_path / "owner.log",
    )
    try:
        deadline = time.monotonic() + 120
        while "worker " not in (tmp_path / "owner.log").read_text() and owner.poll() is None:
            assert time.monotonic() < deadline, "the worker did not start"
            time.sleep(0.2)
        line = next(text for text in (tmp_path / "owner.log").read_text().splitlines() if text.startswith("worker "))
        worker = int(line.split()[1])
        assert psutil.Process(worker).name() == "worker_binary"
        os.kill(owner.pid, signal.SIGKILL)
        owner.wait(timeout=10)
        assert_all_gone({worker: "worker_binary"})
    finally:
        stop_process(owner)


def test_sigterm_stops_the_coordinator(tmp_path):
    instance, log = tmp_path / "instance", tmp_path / "serve.log"
    server = start_logged(edgefl_command("serve", "--instance", str(instance), "--port", "0", "--model", "cnn_small"), log)
    try:
        wait_for_server(instance, server, log)
        children = {p.pid: p.name() for p in psutil.Process(server.pid).children(recursive=True)}
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=30) == 0
        assert_all_gone(children)
        assert not (instance / "server.json").exists()
    finally:
        stop_process(server)


def test_worker_processes_share_the_store_and_a_killed_one_is_replaced(tmp_path, db_url):
    """``serve --workers 2``: devices finish a run served by two WSGI processes over one
    store (SQLite, or a PostgreSQL server), though one of them is SIGKILLed mid-run."""
    config = RunConfig(model="cnn_small", rounds=3, target_reports=4, min_reports=4, round_timeout_s=300, client_lr=0.1)
    before = descendant_pids()
    seen: dict[int, str] = {}
    serve_flags = ["--workers", "2", *(["--db", db_url] if db_url else [])]
    with federation(tmp_path, config, count=4, partition="iid", data_seed=0, serve_flags=serve_flags) as fed:

        def workers():
            children = psutil.Process(fed.server.pid).children()
            return {p.pid for p in children if "coordinator.worker" in " ".join(p.cmdline())}

        deadline = time.monotonic() + 30
        while len(first := workers()) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)  # a worker counts once it has exec'd its command
        assert len(first) == 2
        answered = set()
        deadline = time.monotonic() + 30
        while len(answered) < 2 and time.monotonic() < deadline:
            answered.add(int(requests.get(f"{fed.url}/v1/status", timeout=10).headers["X-Edgefl-Worker"]))
        assert answered == first, "both workers answer requests"

        def kill_a_worker_once(entry):
            seen.update(descendant_pids(before))
            if entry.round == 1:
                os.kill(min(first), signal.SIGKILL)

        status = fed.follow(kill_a_worker_once, timeout_s=600).model_dump(mode="json")
        seen.update(descendant_pids(before))
        assert fed.fleet.wait(timeout=60) == 0, (tmp_path / "logs" / "devices.log").read_text()
        replaced = workers()
        assert len(replaced) == 2 and min(first) not in replaced
    assert_all_gone(seen)
    assert [h["reported"] for h in status["history"]] == [4, 4, 4]
    assert f"WSGI worker {min(first)} exited" in (tmp_path / "logs" / "coordinator.log").read_text()
    if db_url:  # the rows went to the server, none to a SQLite file
        from coordinator.store import Store

        assert not list((tmp_path / "coordinator").glob("*.sqlite3*"))
        with closing(Store(tmp_path / "coordinator", db_url).connect()) as db:
            assert [r[0] for r in db.execute("SELECT status FROM rounds ORDER BY id")] == ["committed"] * 3


def test_litert_devices_run_without_tensorflow_and_a_mixed_fleet_learns_as_keras_does(tmp_path):
    """The same run twice: four Keras devices, then two Keras and two LiteRT devices
    (the on-device .tflite the coordinator publishes). LiteRT steps equal Keras's, so
    the two runs' models are the same but for float rounding. The coordinator then
    serves the final model's artefacts."""
    from ai_edge_litert.interpreter import Interpreter

    config = RunConfig(model="cnn_small", rounds=3, target_reports=4, min_reports=4, round_timeout_s=300, epochs=2, client_lr=0.1)
    before = descendant_pids()
    seen: dict[int, str] = {}
    histories = {}
    for runtime in ("keras", "keras,litert"):
        out = tmp_path / runtime.replace(",", "-")
        with federation(out, config, count=4, partition="iid", data_seed=0, device_flags=["--runtime", runtime]) as fed:
            status = fed.follow(lambda _entry: seen.update(descendant_pids(before)), timeout_s=600).model_dump(mode="json")
            assert fed.fleet.wait(timeout=60) == 0, (out / "logs" / "devices.log").read_text()
            histories[runtime] = [h["accuracy"] for h in status["history"]]
            if runtime == "keras,litert":
                served = wait_for_artefacts(fed.url, version=status["model"]["version"], timeout_s=180)
            seen.update(descendant_pids(before))
        summaries = [json.loads(p.read_text()) for p in sorted((out / "logs" / "devices").glob("device-*.json"))]
        assert [s["runtime"] for s in summaries] == runtime.split(",") * (4 // len(runtime.split(",")))
        for s in summaries:
            assert s["rounds_trained"] == 3
            assert s["tensorflow_imported"] == (s["runtime"] == "keras"), s
    assert_all_gone(seen)
    assert histories["keras,litert"][-1] > 0.8
    # Float rounding, and the order the updates arrive in (a float sum's order), move a
    # few of the 360 test images either way.
    assert histories["keras,litert"] == pytest.approx(histories["keras"], abs=0.03)

    card, inference = served
    assert card["round"] == 3 and card["training"]["custom_ops"] == [] and card["training"]["batch_size"] == config.batch_size
    interpreter = Interpreter(model_content=inference)
    assert interpreter.get_input_details()[0]["shape"].tolist() == [1, 28, 28, 1]
    (int8,) = [f for f in card["files"] if f["kind"] == "int8"]
    assert int8["bytes"] == len(inference) and int8["accuracy"] == pytest.approx(histories["keras,litert"][-1], abs=0.02)


def wait_for_artefacts(url: str, *, version: int, timeout_s: float) -> tuple[dict, bytes]:
    """The model card and int8 file once the coordinator serves ``version``'s, checking
    the ETags: a second request with If-None-Match gets 304."""
    deadline = time.monotonic() + timeout_s
    while True:
        answer = requests.get(f"{url}/v1/models/latest.json", timeout=30)
        if answer.status_code == 200 and int(answer.headers["X-Edgefl-Model-Version"]) == version:
            break
        assert answer.status_code in (200, 503) and time.monotonic() < deadline, answer.text
        time.sleep(1)
    files = {}
    for name in ("latest.json", "latest.tflite", "latest-train.tflite"):
        first = requests.get(f"{url}/v1/models/{name}", timeout=30)
        assert first.status_code == 200 and first.headers["ETag"].strip('"') == hashlib.sha256(first.content).hexdigest()
        again = requests.get(f"{url}/v1/models/{name}", headers={"If-None-Match": first.headers["ETag"]}, timeout=30)
        assert again.status_code == 304
        files[name] = first.content
    return json.loads(files["latest.json"]), files["latest.tflite"]


def test_a_secure_mixed_fleet_learns_like_mean_though_a_device_is_killed_mid_protocol(tmp_path, monkeypatch):
    """The same run with ``mean`` and with ``secure``: two Keras and two LiteRT devices,
    real processes. In the last round, device 1 is SIGKILLed once it has trained: in
    the secure run after it has shared its keys and before it sends its masked input,
    in the mean run before it uploads. Each round completes with the other three at its
    deadline (in the secure run, their neighbours reveal device 1's mask key); an
    operator shortens that deadline mid-run. The first round's model is the mean run's
    to float rounding (the same accuracy); later ones drift apart as training amplifies
    that rounding (and the mean run's own arrival order changes its float sums), so
    learning alike is measured over the last three rounds: their mean accuracy within
    a point of the mean run's (one round is 360 test images, 0.28 points each)."""
    base = dict(model="cnn_small", rounds=8, target_reports=4, min_reports=3, over_selection=1.0, round_timeout_s=300)
    base |= dict(epochs=2, client_lr=0.1, secagg_phase_timeout_s=10)
    monkeypatch.setenv("EDGEFL_HOLD_AT", "secagg_masked_input@8:1,upload@8:1")
    before = descendant_pids()
    seen: dict[int, str] = {}
    accuracy, records = {}, {}
    token = tmp_path / "admin-token"
    token.write_text("an-operator-token-of-some-length")
    for aggregator in ("mean", "secure"):
        out = tmp_path / aggregator
        config = RunConfig(**base, aggregator=aggregator)
        with federation(
            out,
            config,
            count=4,
            partition="iid",
            data_seed=0,
            serve_flags=["--admin-token-file", str(token)],
            device_flags=["--runtime", "keras,litert"],
        ) as fed:
            held = out / "logs" / "devices" / "device-0001.log"

            def shorten_the_rounds(url=fed.url):
                answer = requests.post(
                    f"{url}/v1/admin/config",
                    json={"round_timeout_s": 20},
                    headers={"Authorization": f"Bearer {token.read_text()}"},
                    timeout=30,
                )
                assert answer.status_code == 200, answer.text

            def kill_the_held_device(_entry, fed=fed, held=held, aggregator=aggregator):
                seen.update(descendant_pids(before))
                hold = "secagg_masked_input@8:1" if aggregator == "secure" else "upload@8:1"
                deadline = time.monotonic() + 120
                while not held.exists() or f"holding at {hold}" not in held.read_text():
                    assert time.monotonic() < deadline and fed.fleet.poll() is None, held.read_text()[-2000:]
                    time.sleep(0.1)
                (victim,) = [
                    p
                    for p in psutil.Process(fed.fleet.pid).children()
                    if "--first-index" in p.cmdline() and p.cmdline()[p.cmdline().index("--first-index") + 1] == "1"
                ]
                victim.send_signal(signal.SIGKILL)

            def on_round(entry, kill=kill_the_held_device, shorten=shorten_the_rounds):
                seen.update(descendant_pids(before))
                if entry.round == 5:
                    shorten()
                if entry.round == 7:
                    kill(entry)

            status = fed.follow(on_round, timeout_s=600)
            assert fed.fleet.wait(timeout=60) == 1, (out / "logs" / "devices.log").read_text()  # device 1 was killed
            accuracy[aggregator] = [entry.accuracy for entry in status.history]
            records[aggregator] = requests.get(f"{fed.url}/v1/rounds", timeout=30).json()["rounds"]
            seen.update(descendant_pids(before))
    assert_all_gone(seen)
    secure = [r for r in records["secure"] if r["status"] == "committed"]
    assert [r["number"] for r in secure] == list(range(1, 9))
    assert [r["metrics"]["secagg"]["masked"] for r in secure] == [4] * 7 + [3]
    assert secure[-1]["metrics"]["secagg"]["shared"] == 4 and secure[-1]["metrics"]["secagg"]["revealed"] == 3
    assert [r["reported"] for r in records["mean"] if r["status"] == "committed"] == [4] * 7 + [3]
    assert accuracy["mean"][0] == accuracy["secure"][0] and accuracy["mean"][-1] > 0.9
    last_three = {aggregator: sum(history[-3:]) / 3 for aggregator, history in accuracy.items()}
    assert last_three["secure"] == pytest.approx(last_three["mean"], abs=0.01), accuracy
    assert accuracy["secure"][-1] == pytest.approx(accuracy["mean"][-1], abs=0.02), accuracy


USER_MODEL = """
import tensorflow as tf

def build(input_shape, num_classes):
    layers = tf.keras.layers
    return tf.keras.Sequential([
        tf.keras.Input(shape=input_shape),
        layers.Conv2D(8, 4, strides=2, activation="tanh"),
        layers.AveragePooling2D(2, padding="same"),
        layers.Dropout(0.1),
        layers.Flatten(),
        layers.Dense(32, activation="swish"),
        layers.Dense(num_classes),
    ])
"""


def write_writers_images(root: Path, writers: int, per_writer: int) -> None:
    """The digits as a folder of PNGs per writer and label, each writer in its own style,
    black ink on white paper (the loader inverts it)."""
    from PIL import Image

    from edgefl.datasets import load_dataset
    from edgefl.datasets.style import apply_style, draw_style

    train = load_dataset("digits").train
    for writer in range(writers):
        rows = slice(writer * per_writer, (writer + 1) * per_writer)
        images = apply_style(train.x[rows], draw_style(7, writer))
        for i, (image, label) in enumerate(zip(images, train.y[rows])):
            folder = root / f"writer{writer:02d}" / str(label)
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray((255 * (1.0 - image[..., 0])).astype("uint8")).save(folder / f"{i}.png")


def test_a_users_own_images_and_model_file_train_on_keras_and_litert_devices(tmp_path):
    """Own data (a folder of images per writer, one writer per device), an own model file
    with layers the built-ins lack, client momentum and FedProx, Keras and LiteRT devices;
    the run leaves a CSV, TensorBoard events and a .keras file."""
    import tensorflow as tf
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    write_writers_images(tmp_path / "writers", writers=4, per_writer=120)
    (tmp_path / "my_model.py").write_text(USER_MODEL)
    config = RunConfig(
        model=f"{tmp_path / 'my_model.py'}:build",
        dataset=str(tmp_path / "writers"),
        rounds=3,
        target_reports=4,
        min_reports=4,
        round_timeout_s=300,
        epochs=3,
        batch_size=10,
        client_lr=0.05,
        client_momentum=0.5,
        client_prox_mu=0.01,
    )
    before = descendant_pids()
    seen: dict[int, str] = {}
    with federation(
        tmp_path / "run", config, count=4, partition="natural", data_seed=0, device_flags=["--runtime", "keras,litert"]
    ) as fed:
        status = fed.follow(lambda _entry: seen.update(descendant_pids(before)), timeout_s=600).model_dump(mode="json")
        seen.update(descendant_pids(before))
        assert fed.fleet.wait(timeout=60) == 0, (tmp_path / "run" / "logs" / "devices.log").read_text()
        exported = subprocess.run(
            edgefl_command("export", "--coordinator", fed.url, "--out", str(tmp_path / "out"), "--model", config.model),
            capture_output=True,
            text=True,
            timeout=300,
            stdin=subprocess.DEVNULL,
        )
        assert exported.returncode == 0, exported.stderr
    assert_all_gone(seen)

    history = status["history"]
    assert [h["reported"] for h in history] == [4, 4, 4]
    assert history[-1]["accuracy"] > max(0.4, history[0]["accuracy"])
    summaries = [json.loads(p.read_text()) for p in (tmp_path / "run" / "logs" / "devices").glob("device-*.json")]
    assert sorted((s["runtime"], s["rounds_trained"]) for s in summaries) == [("keras", 3)] * 2 + [("litert", 3)] * 2
    # One writer per device: its 120 images, less the 24 the coordinator tests on and the
    # 19 the device holds out for its personalisation report.
    assert sorted(s["num_examples"] for s in summaries) == [77] * 4

    card = json.loads((tmp_path / "out" / "model_card.json").read_text())
    assert card["labels"] == [str(d) for d in range(10)] and card["input"]["shape"] == [1, 28, 28, 1]
    assert card["training"]["custom_ops"] == [] and card["training"]["one_sgd_step_max_abs_diff_vs_keras"] < 1e-5
    model = tf.keras.models.load_model(tmp_path / "out" / card["keras_file"])
    assert card["keras_file"] == "my_model_build.keras" and model.count_params() > 0

    (results,) = (tmp_path / "run" / "coordinator" / "results").iterdir()
    assert (results / "rounds.csv").read_text().count("\n") == 1 + 3
    board = EventAccumulator(str(results))
    board.Reload()
    accuracy = [(e.step, round(e.value, 4)) for e in board.Scalars("test/accuracy")]
    assert accuracy == [(h["round"], round(h["accuracy"], 4)) for h in history]
