"""The coordinator service: a Flask app over a store, after Flask's tutorial app.

``create_app`` builds the WSGI app for one instance directory; the round driver is
started beside it by ``coordinator.server`` (not on import, so the app can be tested
with Flask's test client). The app sets ``app.extensions["edgefl.update_arrived"]``
when it acknowledges an update, so a driver in the same process folds it at once
instead of at its next poll.
"""
from __future__ import annotations

import threading
from typing import Any, Mapping

from flask import Flask

DEFAULT_MAX_UPLOAD_BYTES = 64 * 1024 * 1024


def create_app(test_config: Mapping[str, Any] | None = None) -> Flask:
    from coordinator import api, errors
    from coordinator.store import Store

    app = Flask(__name__)
    app.config.from_mapping(INSTANCE=None, MAX_CONTENT_LENGTH=DEFAULT_MAX_UPLOAD_BYTES)
    if test_config:
        app.config.from_mapping(test_config)
    if not app.config["INSTANCE"]:
        raise ValueError("create_app needs INSTANCE, the instance directory")
    app.extensions["edgefl.store"] = Store(app.config["INSTANCE"])
    app.extensions["edgefl.update_arrived"] = threading.Event()
    errors.register(app)
    app.register_blueprint(api.bp)
    return app
