"""What the API tests share: a device's calls through Flask's test client, update bodies,
and an app started with the admin token. Not a test module: test modules import this,
never each other."""

from __future__ import annotations

import json
from http.server import BaseHTTPRequestHandler

import numpy as np

from edgefl import wire
from edgefl.models import model_spec

SPEC = model_spec("cnn_small", "digits")


def register(client) -> dict:
    response = client.post("/v1/devices")
    assert response.status_code == 201
    return {"Authorization": f"Bearer {response.json['token']}"}


def take_task(client, headers) -> dict:
    response = client.post("/v1/checkin", headers=headers)
    assert response.status_code == 200, response.json
    assert response.json["status"] == "task", response.json
    return response.json["task"]


def random_delta(seed=0, scale=0.01) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.normal(scale=scale, size=s.shape).astype(np.float32) for s in SPEC]


def update_body(num_examples="10", metrics='{"train_loss": 1.5}', scale=0.01, seed=0, arrays=None, names=None):
    arrays = arrays or random_delta(seed, scale)
    metadata = {"num_examples": num_examples, "metrics": metrics} if num_examples is not None else {}
    return wire.encode(names or [s.name for s in SPEC], arrays, metadata)


def upload(client, headers, round_id, body):
    return client.post(
        f"/v1/rounds/{round_id}/updates", data=body, headers={**headers, "Content-Type": "application/octet-stream"}
    )


def rejections(store) -> list[tuple]:
    """The refused-upload log: (round id, code, late) in order."""
    from contextlib import closing

    with closing(store.connect()) as db:
        return [tuple(r) for r in db.execute("SELECT round_id, code, late FROM rejections ORDER BY id")]


def assert_error(response, status, code):
    assert response.status_code == status, response.get_data(as_text=True)[:300]
    assert response.is_json
    assert response.json["error"] == code
    assert isinstance(response.json["detail"], str) and response.json["detail"].endswith(".")


ADMIN = {"Authorization": "Bearer an-admin-token-of-some-length"}


def build_coordinator(
    instance, small_parts, config, *, db_url=None, admin=False, server=None, clock=None, lobby=False, **settings
):
    """The one way tests build a coordinator: an app on ``instance`` (a directory) with a
    started run of ``config``, and its round driver, which runs only when the test calls
    ``driver.step()``. ``small_parts`` are the session's learner and plain FedAvg server
    (another server is compiled when ``config`` aggregates otherwise); ``admin`` starts the
    app with ``ADMIN``'s token, ``lobby`` makes the driver seat the app's lobby, and
    ``settings`` are more app configuration (``LONG_POLL_SLOTS``, say)."""
    from coordinator import create_app
    from coordinator.aggregation import FedAvgServer, ServerSettings
    from coordinator.driver import RoundDriver

    app = create_app(
        {
            "INSTANCE": str(instance),
            "DB_URL": db_url,
            "TESTING": True,
            **({"ADMIN_TOKEN": ADMIN["Authorization"][7:]} if admin else {}),
            **settings,
        }
    )
    assert "an-admin-token" not in json.dumps({k: str(v) for k, v in app.config.items()})  # kept hashed
    learner, plain = small_parts
    if server is None:
        fedavg = config.aggregator in ("mean", "compressed") and config.server_optimizer == "sgd" and config.server_lr == 1.0
        server = plain if fedavg else FedAvgServer(SPEC, ServerSettings.of(config))
    options = {"clock": clock} if clock is not None else {}
    if lobby:
        options["lobby"] = app.extensions["edgefl.lobby"]
    driver = RoundDriver(app.extensions["edgefl.store"], config, learner=learner, server=server, **options)
    driver.ensure_run()
    return app, driver


def administered(tmp_path, small_parts, config, db_url=None):
    """An app started with the admin token, and its round driver with a started run."""
    return build_coordinator(tmp_path / "instance", small_parts, config, db_url=db_url, admin=True)


class FlakyCoordinator(BaseHTTPRequestHandler):
    """Answers 503 (with Retry-After) until ``failures`` run out, then the real answer."""

    failures = 0
    calls = 0

    def do_GET(self):
        cls = type(self)
        cls.calls += 1
        if cls.failures > 0:
            cls.failures -= 1
            self.send_response(503)
            self.send_header("Retry-After", "0.1")
            self.end_headers()
            return
        if self.path == "/v1/status":
            body, status = json.dumps({"run": None}).encode(), 200
        else:
            body, status = json.dumps({"error": "unknown_checkpoint", "detail": "No such checkpoint."}).encode(), 404
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass
