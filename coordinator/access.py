"""Which calls take a body, from whom, and how large: decided from the headers alone.

A view that takes a body says so with ``takes_body`` (who must send it and its largest
size); every other call takes none. ``BodyPolicy`` applies those declarations in the
server before a byte of a body is read (``coordinator.httpserver``), so a request
without valid credentials, or larger than its call allows, never makes the coordinator
hold its body. Such a request still reaches the app, marked as withheld, and
``answer_withheld`` gives it the answer the app's own checks give (401, 403, 411, 413),
in the API's error format; the upload view refuses an oversized body itself, so its
refusal is logged with the round like every other.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal

from flask import Flask, current_app, request
from werkzeug.exceptions import HTTPException

from coordinator import credentials
from coordinator.database import Connection
from coordinator.errors import ApiError
from coordinator.httpserver import WITHHELD
from coordinator.store import Store

JSON_BODY_BYTES = 64 * 1024  # an operator's JSON request


@dataclass(frozen=True)
class BodyRule:
    credential: Literal["device", "admin"]
    max_bytes: Callable[[Store, Connection], int]
    view_refuses_oversize: bool = False  # the view answers 413 itself (and logs it)


def takes_body(
    credential: Literal["device", "admin"],
    max_bytes: Callable[[Store, Connection], int] | int,
    *,
    view_refuses_oversize: bool = False,
):
    """Declare that a view takes a request body from ``credential`` of at most
    ``max_bytes`` (a number, or a function of the store for one that depends on the run)."""
    limit = max_bytes if callable(max_bytes) else (lambda _store, _db: max_bytes)

    def mark(view):
        view.body_rule = BodyRule(credential, limit, view_refuses_oversize)
        return view

    return mark


def device_of(db: Connection, authorization: str | None, app: Flask) -> str:
    """The device whose token the header carries, or a 401 saying what is wrong."""
    token = credentials.bearer(authorization)
    if token is None:
        raise ApiError(401, "missing_token", "Send the device token as 'Authorization: Bearer <token>'.")
    device_id = app.extensions["edgefl.device_tokens"].device_of(db, token)
    if device_id is None:
        raise ApiError(401, "unknown_token", "This token belongs to no registered device.")
    return device_id


def require_admin(authorization: str | None, app: Flask) -> None:
    """Nothing if the header carries the admin token; else a 403 (no admin token was
    configured) or a 401."""
    expected = app.config.get("ADMIN_TOKEN_SHA256")
    if not expected:
        raise ApiError(403, "admin_disabled", "Control endpoints are off: start the coordinator with an admin token.")
    token = credentials.bearer(authorization)
    if token is None:
        raise ApiError(401, "missing_token", "Send the admin token as 'Authorization: Bearer <token>'.")
    if not credentials.matches(token, expected):
        raise ApiError(401, "bad_admin_token", "That is not the admin token.")


def _check_credential(credential: str, authorization: str | None, db: Connection, app: Flask) -> None:
    if credential == "admin":
        require_admin(authorization, app)
    else:
        device_of(db, authorization, app)


def credential_holds(credential: str, authorization: str | None, db: Connection, app: Flask) -> bool:
    try:
        _check_credential(credential, authorization, db, app)
    except ApiError:
        return False
    return True


class BodyPolicy:
    """The server's question before reading a body: None to read it, or why not.

    It runs on the server's I/O thread, with a connection of its own."""

    def __init__(self, app: Flask):
        self.app = app
        self.routes = app.url_map.bind("localhost")
        self._db: Connection | None = None

    def __call__(self, method: str, path: str, headers: Mapping[str, str], length: int | None) -> str | None:
        try:
            endpoint, _ = self.routes.match(path, method)
        except HTTPException:
            return "no_such_call"
        rule = getattr(self.app.view_functions[endpoint], "body_rule", None)
        if rule is None:
            return "takes_no_body"
        if length is None:  # chunked (whatever Content-Length says): the size is not known up front
            return "length_required"
        try:
            db = self._connection()
            if not credential_holds(rule.credential, headers.get("AUTHORIZATION"), db, self.app):
                return "credentials"
            if length > rule.max_bytes(self.app.extensions["edgefl.store"], db):
                return "too_large"
        except Exception:  # a connection the database dropped: the next request opens another
            self._reset()
            raise
        return None

    def _connection(self) -> Connection:
        if self._db is None:
            self._db = self.app.extensions["edgefl.store"].connect()
        return self._db

    def _reset(self) -> None:
        db, self._db = self._db, None
        if db is not None:
            try:
                db.close()
            except Exception:
                pass


def withheld() -> str | None:
    """Why the server did not read this request's body, or None if it did (or it has none)."""
    return request.headers.get(WITHHELD.replace("_", "-"))


def answer_withheld(db: Connection) -> None:
    """For a request whose body the server did not read: raise the error the app's own
    checks give it. (Returns only for an oversized upload, which the view refuses.)"""
    reason = withheld()
    if reason is None:
        return
    rule: BodyRule | None = getattr(current_app.view_functions.get(request.endpoint), "body_rule", None)
    if rule is None or reason == "takes_no_body":
        raise ApiError(413, "takes_no_body", f"{request.method} {request.path} takes no request body.")
    if reason == "length_required":
        raise ApiError(411, "length_required", "Send the body with a Content-Length header (not chunked).")
    _check_credential(rule.credential, request.headers.get("Authorization"), db, current_app)
    if reason == "too_large" and rule.view_refuses_oversize:
        return
    limit = rule.max_bytes(current_app.extensions["edgefl.store"], db)
    if reason == "too_large" or (request.content_length or 0) > limit:
        raise ApiError(413, "too_large", f"The body is larger than the {limit} bytes this call takes.")
    raise ApiError(503, "busy", "The coordinator could not take this body now; retry.", {"Retry-After": "1"})
