"""The coordinator service: a Flask app over a store, after Flask's tutorial app.

``create_app`` builds the WSGI app for one instance directory; the round driver is
started beside it by ``coordinator.server`` (not on import, so the app can be tested
with Flask's test client). The app sets ``app.extensions["edgefl.update_arrived"]``
when it acknowledges an update, so a driver in the same process folds it at once
instead of at its next poll. Check-ins held for the next round wait in
``app.extensions["edgefl.lobby"]`` (up to ``LONG_POLL_SLOTS`` at once; 0, the
default, answers every check-in at once), which the driver selects from and wakes.
``DB_URL`` names the database (default: SQLite in ``INSTANCE``). ``CHECKIN_RATE`` is the
pace, in check-ins per second, that devices not held are steered to (``coordinator.pace``).
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

from flask import Flask
from flask.json.provider import DefaultJSONProvider
from werkzeug.routing import IntegerConverter

from edgefl import jsonsafe

DEFAULT_MAX_UPLOAD_BYTES = 64 * 1024 * 1024
DEFAULT_LOBBY = 256  # check-ins a server process may hold for the next round, each on a thread of its own
DEFAULT_CHECKIN_RATE = 100.0  # a tenth of what one worker answers on two cores (benchmarks/coordinator_load.py)


class StrictJSON(DefaultJSONProvider):
    """Request bodies parsed by ``edgefl.jsonsafe`` (hostile nesting or digits are a 400,
    not a 500); responses written as strict JSON (non-finite floats as null), so any
    client's parser reads every answer whatever devices reported."""

    def loads(self, s, **kwargs):
        return jsonsafe.loads(s)

    def dumps(self, obj, **kwargs):
        return super().dumps(jsonsafe.finite(obj), allow_nan=False, **kwargs)


class RoundId(IntegerConverter):
    """``<int:...>`` route parameters: ASCII digits only (werkzeug's default also takes
    other scripts' digits, e.g. '١'), at most what the database's integers hold."""

    regex = r"[0-9]{1,10}"

    def __init__(self, map, *args, **kwargs):
        super().__init__(map, *args, max=2**31 - 1, **kwargs)


def create_app(test_config: Mapping[str, Any] | None = None) -> Flask:
    from coordinator import api, dashboard, enrolment, errors, openapi, operators, secagg_api  # noqa: F401 (their views join api.bp)
    from coordinator.credentials import DeviceTokens, token_hash
    from coordinator.enrolment import Enrolment
    from coordinator.lobby import Lobby
    from coordinator.pace import Population
    from coordinator.store import Store

    app = Flask(__name__)
    app.json = StrictJSON(app)
    app.url_map.converters["int"] = RoundId
    app.config.from_mapping(
        INSTANCE=None,
        DB_URL=None,
        MAX_CONTENT_LENGTH=DEFAULT_MAX_UPLOAD_BYTES,
        LONG_POLL_SLOTS=0,
        CHECKIN_RATE=DEFAULT_CHECKIN_RATE,
        ADMIN_TOKEN_SHA256=None,
        WORKER_ID=None,
        ENROLMENT_SECRET_SHA256=None,
        MAX_DEVICES=None,
    )
    if test_config:
        app.config.from_mapping(test_config)
    for secret in ("ADMIN_TOKEN", "ENROLMENT_SECRET"):  # kept only as their hashes
        value = app.config.pop(secret, None)
        if value:
            app.config[f"{secret}_SHA256"] = token_hash(value)
    if not app.config["INSTANCE"]:
        raise ValueError("create_app needs INSTANCE, the instance directory")
    app.extensions["edgefl.store"] = Store(app.config["INSTANCE"], app.config["DB_URL"])
    app.extensions["edgefl.device_tokens"] = DeviceTokens()
    app.extensions["edgefl.enrolment"] = Enrolment(
        secret_sha256=app.config["ENROLMENT_SECRET_SHA256"], max_devices=app.config["MAX_DEVICES"] or enrolment.MAX_DEVICES
    )
    app.extensions["edgefl.update_arrived"] = threading.Event()
    app.extensions["edgefl.lobby"] = Lobby()
    app.extensions["edgefl.population"] = Population()
    slots = app.config["LONG_POLL_SLOTS"]
    app.extensions["edgefl.long_poll_slots"] = threading.BoundedSemaphore(slots) if slots else None
    worker_id = app.config["WORKER_ID"]
    if worker_id:

        @app.after_request
        def _name_the_worker(response):
            """Which of several worker processes answered, for operators and tests."""
            response.headers["X-Edgefl-Worker"] = worker_id
            return response

    errors.register(app)
    app.url_map.converters["sha256"] = openapi.Sha256Converter
    app.register_blueprint(api.bp)
    app.register_blueprint(dashboard.bp)
    openapi.spec.register(app)
    return app
