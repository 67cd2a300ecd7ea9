"""The dashboard in headless Chromium against a fake ``v1/status``: no training, seconds.

The page is served by the real blueprint and static files; the status it polls is a
fixed sequence of JSON documents, the last of which stays. Every point Chromium drew
(the page records them from Chart.js's own parsed data) must match that document, a
null anywhere must only leave its point out, and no script error may occur.
"""

from __future__ import annotations

import math
import re
import threading
from pathlib import Path

import pytest
import requests
from flask import Flask, jsonify
from werkzeug.serving import make_server

import coordinator
from coordinator import dashboard
from tests.processes import assert_all_gone, chromium

RUN = {
    "status": "running",
    "config": {"model": "cnn_small", "dataset": "digits", "rounds": 5},
    "config_changes": [],
    "created_at": 1.7e9,
    "finished_at": None,
}


def entry(round_, accuracy, loss, **more):
    base = {
        "round": round_,
        "accuracy": accuracy,
        "loss": loss,
        "selected": 5,
        "reported": 4,
        "late": 1,
        "dropped": 0,
        "rejected": 0,
        "bytes_down": 1_234_567,
        "bytes_up": 345_678,
        "seconds": 3.2,
        "aggregation_seconds": 0.1,
        "phase_seconds": {},
        "personalization": {"devices": 4, "examples": 80, "global_accuracy": 0.8123, "personalized_accuracy": 0.9012},
        "privacy": None,
        "bytes_up_float32": 1_382_712,
        "upload_bits": 8,
    }
    return {**base, **more}


FULL = {
    "run": RUN,
    "model": {"version": 3, "sha256": "ab" * 32, "size": 1000, "url": "/v1/checkpoints/x"},
    "round": {"number": 5, "status": "open", "reported": 1, "selected": 5, "target_reports": 4, "seconds_left": None},
    "devices": 6,
    "history": [
        entry(
            1,
            0.4567,
            1.9876,
            late=None,
            privacy={"epsilon": 1.2345, "delta": 1e-5},
            measurements={"zeroing/clipping_norm": 0.8123, "zeroing_norm": 9.5, "zeroed_count": 1.0},
        ),
        # A round whose model could not be evaluated, and whose devices sent no personalisation.
        entry(2, None, None, personalization=None, privacy={"epsilon": None, "delta": 1e-5}, bytes_up_float32=None),
        entry(
            3,
            0.9321,
            0.2468,
            personalization={"global_accuracy": 0.7, "personalized_accuracy": None},
            privacy={"epsilon": 2.5432, "delta": 1e-5},
            upload_bits=None,
            bytes_down=None,
            measurements={"zeroing/dp_query_metrics/clip": 0.1234, "zeroing_norm": None, "zeroed_count": 0.0},
        ),
    ],
    "abandoned": [
        {"round": 2, "id": 2, "reason": "too_few_reports", "detail": "1 of 4 reports by the deadline.", "at": 1.7e9},
        {"round": 4, "id": 5, "reason": "non_finite_model", "detail": "The new model had NaN weights <b>.", "at": 1.7e9 + 60},
    ],
}
EMPTY = {
    "run": RUN,
    "model": {"version": 0, "sha256": "cd" * 32, "size": 1000, "url": "/v1/checkpoints/y"},
    "round": None,
    "devices": 0,
    "history": [],
}  # an older server: no "abandoned" key
NO_RUN = {"run": None}


def expected_points(status: dict) -> dict[tuple[str, int], str]:
    """What the page must draw: every finite number, formatted as the page records it."""
    points = {}

    def put(series, round_, value, decimals):
        if isinstance(value, (int, float)) and math.isfinite(value):
            points[series, round_] = f"{value:.{decimals}f}"

    for h in status.get("history") or []:
        r = h["round"]
        put("accuracy", r, h["accuracy"], 4)
        put("loss", r, h["loss"], 4)
        for series in ("selected", "reported", "late", "dropped"):
            put(series, r, h[series], 0)
        for series, key in (("mb_down", "bytes_down"), ("mb_up", "bytes_up")):
            put(series, r, h[key] and h[key] / 1e6, 3)
        if h["upload_bits"]:
            put("mb_up_float32", r, h["bytes_up_float32"] and h["bytes_up_float32"] / 1e6, 3)
        personal = h["personalization"] or {}
        put("on_device_global", r, personal.get("global_accuracy"), 4)
        put("personalized", r, personal.get("personalized_accuracy"), 4)
        put("epsilon", r, (h["privacy"] or {}).get("epsilon"), 4)
        measured = h.get("measurements") or {}
        clip = measured.get("zeroing/clipping_norm", measured.get("zeroing/dp_query_metrics/clip"))
        put("clip_norm", r, clip, 4)
        put("zeroing_norm", r, measured.get("zeroing_norm"), 4)
        put("zeroed", r, measured.get("zeroed_count"), 0)
    return points


@pytest.fixture
def serve_status():
    """Starts the dashboard on 127.0.0.1 (a thread of this process) over a sequence of
    status documents; yields a function that takes the sequence and returns the URL."""
    servers = []

    def start(sequence: list[dict]) -> str:
        root = Path(coordinator.__file__).parent
        app = Flask("fake_coordinator", static_folder=root / "static", template_folder=root / "templates")
        app.register_blueprint(dashboard.bp)
        polls = iter(sequence)
        last = sequence[-1]

        @app.get("/v1/status")
        def status():
            return jsonify(next(polls, last))

        server = make_server("127.0.0.1", 0, app, threaded=True)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_port}/"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def render(url: str, tmp_path: Path) -> str:
    dom, started = chromium(url, tmp_path, "--dump-dom", timeout_s=90)
    assert_all_gone(started)
    assert 'data-rendered="ok"' in dom, dom[:3000]
    assert "data-error=" not in dom, re.search(r'data-error="[^"]*"', dom).group(0)
    return dom


def drawn_points(dom: str) -> dict[tuple[str, int], str]:
    found = re.findall(r'data-series="(\w+)" data-round="(\d+)" data-value="([^"]+)"', dom)
    assert len(found) == len({(s, r) for s, r, _ in found}), "a point was drawn twice"
    return {(s, int(r)): v for s, r, v in found}


def tag(dom: str, element_id: str) -> str:
    return re.search(rf'<\w+ id="{element_id}"[^>]*>', dom).group(0)


@pytest.mark.parametrize("sequence", [[NO_RUN, EMPTY, FULL], [FULL, EMPTY, FULL]], ids=["growing", "emptied"])
def test_every_finite_number_is_drawn_and_nulls_are_left_out(serve_status, tmp_path, sequence):
    """The status changes under the page between polls; the final draw matches the last."""
    dom = render(serve_status(sequence), tmp_path)
    assert drawn_points(dom) == expected_points(FULL)
    assert ("accuracy", 2) not in drawn_points(dom) and ("mb_down", 3) not in drawn_points(dom)
    assert "hidden" not in tag(dom, "privacy-figure") and "hidden" not in tag(dom, "aggregator-figure")
    # The abandoned rounds are listed (their text escaped), and round 4 has a slot on the axis.
    assert "hidden" not in tag(dom, "abandoned")
    rows = re.findall(r'data-abandoned-round="(\d+)" data-reason="(\w+)"', dom)
    assert rows == [("2", "too_few_reports"), ("4", "non_finite_model")]
    assert "NaN weights &lt;b&gt;." in dom
    assert "run running: model cnn_small on digits, 3/5 rounds, 6 devices registered, model version 3" in dom
    assert "round 5 open: 1/4 reports, 5 selected" in dom
    assert 'data-rounds="3"' in dom


@pytest.mark.parametrize("status", [EMPTY, NO_RUN], ids=["empty-history", "no-run"])
def test_an_empty_or_missing_run_draws_nothing_without_errors(serve_status, tmp_path, status):
    dom = render(serve_status([status]), tmp_path)
    assert drawn_points(dom) == {}
    assert "hidden" in tag(dom, "abandoned") and "hidden" in tag(dom, "privacy-figure")
    assert "hidden" in tag(dom, "aggregator-figure")
    assert ("no run yet" in dom) == (status is NO_RUN)
    assert "no round open" in dom


def test_the_page_loads_only_from_its_own_coordinator(serve_status):
    """Every script, style and icon is relative (or inline), and each is served."""
    url = serve_status([NO_RUN])
    page = requests.get(url, timeout=10).text
    links = re.findall(r'(?:src|href)="([^"]+)"', page)
    assert any(link.endswith("vendor/chartjs/chart.umd.js") for link in links)
    for link in links:
        assert not re.match(r"^(https?:)?//", link), link
        if not link.startswith("data:"):
            assert requests.get(url.rstrip("/") + link, timeout=10).status_code == 200, link
