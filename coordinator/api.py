"""The /v1 API blueprint and what devices call (operators' calls: ``coordinator.operators``).

Every handler checks everything it can before it writes, and writes in one
transaction, so a rejected request leaves the store as it found it. An update is
acknowledged (202) only after its blob is fsynced and its row committed.
"""

from __future__ import annotations

import json
import math
import random
import re
import time
import uuid
from collections.abc import Callable

from flask import Blueprint, current_app, g, jsonify, request, send_file
from spectree import Response

from coordinator import DEFAULT_MAX_UPLOAD_BYTES, access, credentials, pace, rounds
from coordinator.access import takes_body
from coordinator.database import Connection
from coordinator.errors import ApiError
from coordinator.lifecycle import MessageKind
from coordinator.openapi import DEVICE, ENROLMENT, ErrorBody, raw_body, spec
from coordinator.store import Store
from edgefl import codecs, failpoints, jsonsafe, limits, wire
from edgefl.protocol import CheckinAnswer, DeviceRegistration, UpdateAccepted

bp = Blueprint("api", __name__, url_prefix="/v1")

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
HEADER_SLACK_BYTES = 1 << 20
_LONG_POLL_S = 10.0  # well under the devices' read timeout and waitress's channel timeout
_RECHECK_S = 1.0  # a held check-in asks again this often even unwoken (e.g. a deadline passed)
rng = random.Random()


def get_store() -> Store:
    return current_app.extensions["edgefl.store"]


def get_db() -> Connection:
    if "db" not in g:
        g.db = get_store().connect()
    return g.db


@bp.teardown_app_request
def _close_db(_exc) -> None:
    _release_db()


def _release_db() -> None:
    db = g.pop("db", None)
    if db is not None:
        db.close()


def authenticated_device() -> str:
    return access.device_of(get_db(), request.headers.get("Authorization"), current_app)


def _device_if_any() -> str | None:
    """The device whose token the request carries, if it carries a valid one."""
    return current_app.extensions["edgefl.device_tokens"].device_of(
        get_db(), credentials.bearer(request.headers.get("Authorization"))
    )


@bp.before_request
def _answer_withheld_bodies() -> None:
    if access.withheld():
        access.answer_withheld(get_db())


def require_run(db: Connection):
    config = rounds.run_config(db)
    if config is None:
        raise ApiError(503, "no_run", "No run has started yet; try again shortly.", {"Retry-After": "1"})
    return config


def errors(*statuses: int) -> dict:
    return {f"HTTP_{status}": ErrorBody for status in statuses}


@bp.get("/openapi.json")
def openapi_document():
    return jsonify(spec.spec)


@bp.post("/devices")
@spec.validate(resp=Response(HTTP_201=DeviceRegistration, **errors(401, 429)), security=ENROLMENT, tags=["devices"])
def register_device():
    """Register a device: its id and bearer token.

    With an enrolment secret configured, only a caller that sends it may register;
    without one, anyone may, at a bounded rate and up to a bounded number of devices."""
    token, token_sha256 = credentials.new_token()
    device_id = uuid.uuid4().hex
    db = get_db()
    enrolment = current_app.extensions["edgefl.enrolment"]
    enrolment.admit(request.headers.get("Authorization"))  # before the write lock: refusals queue for nothing
    with get_store().transaction(db):
        enrolment.check_room(db.execute("SELECT COUNT(*) FROM devices").fetchone()[0])
        db.execute(
            "INSERT INTO devices (id, token_hash, created_at) VALUES (?, ?, ?)",
            (device_id, token_sha256, time.time()),
        )
    return DeviceRegistration(device_id=device_id, token=token), 201


@bp.post("/checkin")
@spec.validate(
    resp=Response(HTTP_200=CheckinAnswer, **errors(401, 503)), security=DEVICE, tags=["devices"], skip_validation=True
)  # no body; the hot path
def checkin():
    """Ask for a task: a task, or when to come back.

    A task, or when to come back. A device the next round will want is held in the
    lobby (while a long-poll slot is free) and answered as soon as the round driver
    opens a round or finishes the run, instead of sleeping through the first moments of
    the round it is needed for. Any other wait is steered (``coordinator.pace``)."""
    device_id = authenticated_device()
    db = get_db()
    require_run(db)

    def ask() -> CheckinAnswer:
        db = get_db()
        with get_store().reading(db):
            answer = rounds.checkin(db, device_id, time.time(), rng, may_assign=False)
        if answer is None:  # to be selected: again under the write lock (the cohort may have filled)
            with get_store().transaction(db):
                answer = rounds.checkin(db, device_id, time.time(), rng)
        return answer

    answer = ask()
    slots = current_app.extensions["edgefl.long_poll_slots"]
    if answer.wanted_next and slots is not None and slots.acquire(blocking=False):
        lobby = current_app.extensions["edgefl.lobby"]
        try:
            seen = lobby.enter(device_id)  # None: this device is held already; answered at once
            if seen is not None:
                held = 0.0
                try:
                    deadline = time.monotonic() + _LONG_POLL_S
                    while answer.wanted_next and not lobby.closed and time.monotonic() < deadline:
                        _release_db()  # a held check-in keeps no database connection (PostgreSQL has few)
                        waited_since = time.monotonic()
                        seen = lobby.wait(seen, timeout=min(_RECHECK_S, deadline - time.monotonic()))
                        held += time.monotonic() - waited_since
                        answer = ask()
                finally:
                    lobby.leave(device_id)
                answer.held_s = round(held, 3)  # the waiting alone: the rest of the latency is service
        finally:
            slots.release()
    if answer.status == "wait":  # spread over the population, so that the fleet does not come back all at once
        in_lobby = len(current_app.extensions["edgefl.lobby"].waiting())
        outside = current_app.extensions["edgefl.population"].count(get_db()) - in_lobby
        answer.retry_after = pace.steered_retry_s(
            answer.retry_after, outside=outside, checkins_per_s=current_app.config["CHECKIN_RATE"], rng=rng
        )
    response = jsonify(answer.model_dump(exclude_none=True))
    if answer.status == "wait":
        response.headers["Retry-After"] = str(math.ceil(answer.retry_after))
    return response


@bp.get("/checkpoints/<sha256:sha256>")
@spec.validate(
    resp=Response("HTTP_200", "HTTP_304", **errors(404)), tags=["devices"], skip_validation=True
)  # a file: nothing to validate
def get_checkpoint(sha256: str):
    """Download a checkpoint (safetensors; immutable, so cacheable forever).

    Anyone may download one, as from a CDN, and that changes nothing. A device that
    sends its token has the bytes of a whole GET charged to the round it trains (HEAD,
    304 and partial answers are not counted)."""
    db = get_db()
    row = db.execute("SELECT size FROM checkpoints WHERE sha256 = ?", (sha256,)).fetchone() if _SHA256.match(sha256) else None
    if row is None:
        raise ApiError(404, "unknown_checkpoint", f"No checkpoint has sha256 {sha256[:80]}.")
    response = send_file(
        get_store().blobs.sendable(sha256), mimetype="application/octet-stream", etag=sha256, conditional=True, max_age=31536000
    )
    response.cache_control.public = True
    response.cache_control.immutable = True
    if request.method == "GET" and response.status_code == 200 and (device_id := _device_if_any()):
        with get_store().transaction(db):
            rounds.count_bytes_down(db, device_id, sha256, response.content_length or 0)
    return response


_ARTEFACT_RETRY_S = 5


def _send_artefact(kind: str, name: str):
    """The newest artefact of ``kind``: revalidated by its ETag (the blob's sha256), as
    "latest" changes when a round commits."""
    from coordinator.artefacts import KINDS, latest

    row = latest(get_db(), kind)
    if row is None:
        raise ApiError(
            503,
            "not_built_yet",
            "The artefacts of the first model are being built; retry shortly.",
            headers={"Retry-After": str(_ARTEFACT_RETRY_S)},
        )
    response = send_file(
        get_store().blobs.sendable(row["sha256"]),
        mimetype=KINDS[kind][1],
        etag=row["sha256"],
        conditional=True,
        max_age=0,
        download_name=name,
    )
    response.headers["X-Edgefl-Model-Version"] = str(row["version"])
    response.headers["X-Edgefl-Train-Batch"] = str(row["batch_size"])
    return response


@bp.get("/models/latest.tflite")
@spec.validate(resp=Response("HTTP_200", "HTTP_304", **errors(503)), tags=["models"], skip_validation=True)
def get_latest_inference_model():
    """The newest model as an int8 .tflite for inference on phones (float32 input and output)."""
    return _send_artefact("inference", "latest.tflite")


@bp.get("/models/latest-train.tflite")
@spec.validate(resp=Response("HTTP_200", "HTTP_304", **errors(409, 503)), tags=["models"], skip_validation=True)
def get_latest_training_model():
    """The on-device training .tflite (builtin ops only; signatures train, infer,
    get_weights, set_weights) holding the newest model, for the batch size in
    X-Edgefl-Train-Batch."""
    from coordinator.artefacts import latest

    if latest(get_db(), "training") is None and (card := latest(get_db(), "card")) is not None:
        refused = (json.loads(get_store().blobs.get(card["sha256"])).get("training") or {}).get("refused")
        if refused:
            raise ApiError(
                409,
                "not_trainable_on_device",
                f"The run's model cannot train on LiteRT devices: {refused}; Keras devices can train it.",
            )
    return _send_artefact("training", "latest-train.tflite")


@bp.get("/models/latest.json")
@spec.validate(resp=Response("HTTP_200", "HTTP_304", **errors(503)), tags=["models"], skip_validation=True)
def get_latest_model_card():
    """The model card of the newest artefacts: sizes, accuracy and agreement with Keras
    as measured on LiteRT."""
    return _send_artefact("card", "latest.json")


@bp.post("/rounds/<int:round_id>/updates")
@takes_body("device", lambda store, db: _largest_upload(store, db), view_refuses_oversize=True)
@raw_body("application/octet-stream", DEFAULT_MAX_UPLOAD_BYTES)
@spec.validate(
    resp=Response(HTTP_202=UpdateAccepted, **errors(400, 401, 403, 404, 409, 413, 422, 503)), security=DEVICE, tags=["devices"]
)
def upload_update(round_id: int):
    """Upload a device's weight delta for a round it was selected into (safetensors,
    metadata num_examples and metrics); acknowledged once durable."""
    device_id = authenticated_device()
    return logging_rejections(get_db(), round_id, device_id, _accept_update)


def logging_rejections(db: Connection, round_id: int, device_id: str, accept):
    """``accept(db, round_id, device_id)``, with a refusal of a device's message to a
    known round logged (once per device, round and reason) before it is raised."""
    try:
        return accept(db, round_id, device_id)
    except ApiError as error:
        if (
            error.code != "unknown_round"
            and db.execute("SELECT 1 FROM rounds WHERE id = ?", (round_id,)).fetchone()
            and rounds.rejection_is_new(db, round_id, device_id, error.code)
        ):
            with get_store().transaction(db):
                rounds.record_rejection(db, round_id, device_id, error.code, request.content_length or 0, time.time())
        raise


def _accept_update(db: Connection, round_id: int, device_id: str):
    config = require_run(db)
    rejection = rounds.message_rejection(db, round_id, device_id)
    if rejection:
        raise ApiError(rejection.status, rejection.code, rejection.detail)

    spec = update_spec(get_store(), db)
    codec = config.upload_codec
    limit = codec.payload_bytes(spec) + HEADER_SLACK_BYTES
    if (request.content_length or 0) > limit:
        raise ApiError(413, "update_too_large", f"An update for model {config.model} is at most {limit} bytes.")
    if access.withheld():  # the server could not check it, so did not read it
        raise ApiError(503, "busy", "The coordinator could not take this upload now; retry.", {"Retry-After": "1"})
    body = request.get_data(cache=False)
    try:
        _, metadata = codec.decode(body, spec)
    except wire.WireError as exc:
        raise ApiError(400 if exc.code == "malformed" else 422, exc.code, exc.detail) from None
    num_examples, metrics = _update_metadata(metadata)
    reports = store_message(db, round_id, device_id, MessageKind.UPDATE, body, num_examples, metrics)
    return UpdateAccepted(round_id=round_id, accepted=True, reports=reports), 202


def store_message(
    db: Connection,
    round_id: int,
    device_id: str,
    kind: MessageKind,
    body: bytes,
    num_examples: int = 0,
    metrics: dict | None = None,
    check: Callable[[], None] = lambda: None,
) -> int:
    """Keep a checked message of a device: its bytes fsynced as a blob, then its row, in
    one write transaction that first asks again whether the device may send it (and
    ``check``, for what depends on the other messages); how many messages the round's
    phase holds now. Nothing is left behind if it is refused."""
    store = get_store()
    blob_sha256 = store.blobs.put(body)
    failpoints.hold("update_stored")  # durable bytes, no row yet: the device has no answer
    try:
        with store.transaction(db):
            rejection = rounds.message_rejection(db, round_id, device_id, kind)
            if rejection:
                raise ApiError(rejection.status, rejection.code, rejection.detail)
            check()
            if not store.blobs.exists(blob_sha256):  # identical bytes of a finished round, discarded meanwhile
                store.blobs.put(body)
            count = rounds.record_message(
                db, round_id, device_id, blob_sha256, num_examples, len(body), metrics or {}, time.time(), kind
            )
    except BaseException:
        with store.transaction(db):  # under the write lock, so no upload of the same bytes commits meanwhile
            if not db.execute("SELECT 1 FROM messages WHERE blob_sha256 = ?", (blob_sha256,)).fetchone():
                store.blobs.delete(blob_sha256)
        raise
    current_app.extensions["edgefl.update_arrived"].set()
    return count


_SPECS: dict[str, tuple[wire.TensorSpec, ...]] = {}


def update_spec(store: Store, db: Connection) -> tuple[wire.TensorSpec, ...]:
    """What every update must hold: the tensors of the run's checkpoints, read from the
    first one (once per process). The API never builds the model, so WSGI worker
    processes need no TensorFlow."""
    (sha256,) = db.execute("SELECT sha256 FROM checkpoints WHERE version = 0").fetchone()
    if sha256 not in _SPECS:
        _SPECS[sha256] = wire.spec_of_payload(store.blobs.get(sha256))
    return _SPECS[sha256]


def _largest_upload(store: Store, db: Connection) -> int:
    """The most bytes any acceptable upload of this run can have (float32 tensors)."""
    if rounds.run_config(db) is None:
        return 0
    return codecs.FLOAT32.payload_bytes(update_spec(store, db)) + HEADER_SLACK_BYTES


def _update_metadata(metadata: dict[str, str]) -> tuple[int, dict[str, float]]:
    """An update's example count and metrics, within ``edgefl.limits``."""
    raw = metadata.get("num_examples", "")
    if not (raw.isascii() and raw.isdigit() and len(raw) <= 10) or not 1 <= int(raw) <= limits.MAX_EXAMPLES:
        raise ApiError(400, "bad_num_examples", f"Metadata num_examples must be a whole number from 1 to {limits.MAX_EXAMPLES}.")
    try:
        metrics = jsonsafe.loads(metadata.get("metrics", "{}"), max_depth=1)
    except jsonsafe.JsonError as error:
        raise ApiError(400, "bad_metrics", f"Metadata metrics are not JSON: {error}.") from None
    problem = limits.metrics_problem(metrics)
    if problem:
        raise ApiError(400, "bad_metrics", f"Metadata metrics are refused: {problem}.")
    return int(raw), metrics
