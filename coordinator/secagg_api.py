"""What devices call in a secure round (SecAgg+, ``coordinator.lifecycle.SECURE``).

A device that trained posts its public keys; then, as the round driver moves the round
through its phases, it asks ``GET /v1/rounds/{id}/secagg`` for what the phase needs
(its neighbours' keys, the shares sealed for it, which neighbours' inputs arrived) and
posts its sealed shares, its masked input and the shares it reveals. Each message is
checked before it is stored (``coordinator.secure``) and stored like an update
(``api.store_message``): a refused message leaves the store as it was, an acknowledged
one survives a crash. The views join the API's blueprint.
"""

from __future__ import annotations

import functools
import time

from flask import current_app, request
from spectree import Response

from coordinator import access, rounds
from coordinator.access import takes_body
from coordinator.api import (
    HEADER_SLACK_BYTES,
    authenticated_device,
    bp,
    errors,
    get_db,
    get_store,
    logging_rejections,
    require_run,
    rng,
    store_message,
    update_spec,
)
from coordinator.database import Connection
from coordinator.errors import ApiError
from coordinator.lifecycle import SECURE, MessageKind, Phase
from coordinator.openapi import DEVICE, raw_body, spec
from coordinator.secure import SecureRound, encode, keys_in_use
from edgefl.config import RunConfig
from edgefl.protocol import (
    RoundStatus,
    SecAggAccepted,
    SecAggKeys,
    SecAggParams,
    SecAggReveal,
    SecAggSeen,
    SecAggShares,
    SecAggView,
)
from edgefl.secagg import protocol, shamir
from edgefl.secagg.quantize import SecureMeanLayout

_POLL_S = 0.25  # a device asks again about this often (0.5 to 1.5 times, jittered) while its round's phase is unchanged
_HOLD_S = 5.0  # a view asked with ``seen`` is held at most this long
_RECHECK_S = 0.02
_MESSAGE_ERRORS = errors(400, 401, 403, 404, 409, 413, 415, 422, 503)


def device_only(view):
    """The device's credentials are checked before its body is validated."""

    @functools.wraps(view)
    def guarded(*args, **kwargs):
        authenticated_device()
        return view(*args, **kwargs)

    return guarded


def _secure_config(db: Connection) -> RunConfig:
    config = require_run(db)
    if config.aggregator != "secure":
        raise ApiError(409, "not_secure", "This run's aggregator is not secure: devices upload updates instead.")
    return config


def _secure_round(db: Connection, config: RunConfig, round_id: int) -> SecureRound:
    layout = SecureMeanLayout.of(update_spec(get_store(), db))
    return SecureRound.load(db, get_store().blobs.get, config, round_id, layout.size)


def _round(db: Connection, round_id: int):
    row = rounds.round_by_id(db, round_id)
    if row is None:
        raise ApiError(404, "unknown_round", f"There is no round {round_id}.")
    return row


def _largest(per_neighbour: int):
    """A body's limit: ``per_neighbour`` bytes for each device of the largest cohort."""

    def limit(_store, db: Connection) -> int:
        config = rounds.run_config(db)
        return (config.cohort_size if config else 1) * per_neighbour + access.JSON_BODY_BYTES

    return limit


def _largest_masked_input(store, db: Connection) -> int:
    config = rounds.run_config(db)
    if config is None:
        return 0
    layout = SecureMeanLayout.of(update_spec(store, db))
    return layout.size * 8 + HEADER_SLACK_BYTES  # entries are at most 8 bytes wide


@bp.get("/rounds/<int:round_id>/secagg")
@spec.validate(
    query=SecAggSeen, resp=Response(HTTP_200=SecAggView, **errors(401, 403, 404, 409, 422, 503)), security=DEVICE, tags=["secure"]
)
def secagg_view(round_id: int, query: SecAggSeen):
    """What this device needs for its secure round's current phase. With ``seen`` (the
    phase it last answered), the answer is held for up to a few seconds while the round
    is still in that phase (a long-poll slot permitting), so the device learns of the
    next phase when it opens; else ask again after ``retry_after`` seconds."""
    device_id = authenticated_device()
    db = get_db()
    config = _secure_config(db)
    with get_store().reading(db):
        _round(db, round_id)
        if not db.execute("SELECT 1 FROM assignments WHERE round_id = ? AND device_id = ?", (round_id, device_id)).fetchone():
            raise ApiError(403, "not_selected", f"This device was not selected for round {round_id}.")
    if query.seen:
        _hold_while_in(db, round_id, query.seen)
    with get_store().reading(db):
        row = _round(db, round_id)
        view = SecAggView(
            round_id=round_id, status=row["status"], phase=row["phase"], retry_after=round(_POLL_S * (0.5 + rng.random()), 3)
        )
        if row["status"] != RoundStatus.OPEN or not SECURE.reached(row["phase"], Phase.SHARE):
            return view
        secure = _secure_round(db, config, round_id)
        me = secure.index(device_id)
        p = secure.params
        view.params = SecAggParams(
            index=me, devices=p.devices, size=p.size, bits=p.bits, degree=p.degree, threshold=p.threshold, graph_seed=p.graph_seed
        )
        view.keys = {
            v: SecAggKeys(encryption=secure.keys[v].encryption.hex(), masking=secure.keys[v].masking.hex())
            for v in p.neighbours[me]
        }
        if SECURE.reached(row["phase"], Phase.MASKED_INPUT):
            view.shares = secure.shares_for(me)
        if SECURE.reached(row["phase"], Phase.UNMASK):
            view.masked = sorted(secure.masked & set(p.neighbours[me]))
    return view


def _hold_while_in(db: Connection, round_id: int, phase: str) -> None:
    """Wait (up to ``_HOLD_S``, on one of the long-poll slots the lobby also uses, if one
    is free) while the round is open in ``phase``: the round driver may run in another
    process, so the store is asked, every ``_RECHECK_S``."""
    slots = current_app.extensions["edgefl.long_poll_slots"]
    if slots is None or not slots.acquire(blocking=False):
        return
    try:
        deadline = time.monotonic() + _HOLD_S
        while time.monotonic() < deadline:
            with get_store().reading(db):
                row = db.execute("SELECT status, phase FROM rounds WHERE id = ?", (round_id,)).fetchone()
            if row is None or (row["status"], row["phase"]) != (RoundStatus.OPEN, phase):
                return
            time.sleep(_RECHECK_S)
    finally:
        slots.release()


def _accept(round_id: int, kind: MessageKind, body: bytes, check_before, check_inside=lambda db, secure: None):
    """A device's protocol message: refused unless the round is in the phase that takes
    it and the device one of the phase's participants, then checked and stored."""
    device_id = authenticated_device()

    def accept(db: Connection, round_id: int, device_id: str):
        config = _secure_config(db)
        rejection = rounds.message_rejection(db, round_id, device_id, kind)
        if rejection:
            raise ApiError(rejection.status, rejection.code, rejection.detail)
        secure = None if kind == MessageKind.KEYS else _secure_round(db, config, round_id)
        check_before(secure, secure.index(device_id) if secure else None)
        count = store_message(db, round_id, device_id, kind, body, check=lambda: check_inside(db, secure))
        return SecAggAccepted(round_id=round_id, phase=_round(db, round_id)["phase"], messages=count), 202

    return logging_rejections(get_db(), round_id, device_id, accept)


@bp.post("/rounds/<int:round_id>/secagg/keys")
@takes_body("device", access.JSON_BODY_BYTES)
@device_only
@spec.validate(json=SecAggKeys, resp=Response(HTTP_202=SecAggAccepted, **_MESSAGE_ERRORS), security=DEVICE, tags=["secure"])
def advertise_keys(round_id: int, json: SecAggKeys):
    """Phase 1: this device's two X25519 public keys, once it has trained."""
    if json.encryption == json.masking:
        raise ApiError(422, "bad_keys", "The encryption and masking keys must differ.")

    def not_in_use(db: Connection, _secure) -> None:
        if keys_in_use(db, get_store().blobs.get, round_id, json):
            raise ApiError(409, "keys_in_use", "Another device of this round advertised one of these keys.")

    return _accept(round_id, MessageKind.KEYS, encode(json), lambda _secure, _me: None, not_in_use)


@bp.post("/rounds/<int:round_id>/secagg/shares")
@takes_body("device", _largest(2 * protocol.SEALED_PAIR_BYTES + 16))
@device_only
@spec.validate(json=SecAggShares, resp=Response(HTTP_202=SecAggAccepted, **_MESSAGE_ERRORS), security=DEVICE, tags=["secure"])
def share_keys(round_id: int, json: SecAggShares):
    """Phase 2: for each neighbour, the pair of shares (self-mask seed, mask key) sealed for it."""
    return _accept(round_id, MessageKind.SHARES, encode(json), lambda secure, me: secure.check_shares(me, json))


@bp.post("/rounds/<int:round_id>/secagg/masked")
@takes_body("device", _largest_masked_input)
@raw_body("application/octet-stream", 8 * 1 << 30)
@device_only
@spec.validate(resp=Response(HTTP_202=SecAggAccepted, **_MESSAGE_ERRORS), security=DEVICE, tags=["secure"])
def masked_input(round_id: int):
    """Phase 3: the device's input plus its masks, modulo 2^bits, each entry in
    ceil(bits / 8) little-endian bytes (``edgefl.secagg.packing``)."""
    if access.withheld():
        raise ApiError(503, "busy", "The coordinator could not take this upload now; retry.", {"Retry-After": "1"})
    body = request.get_data(cache=False)
    return _accept(round_id, MessageKind.MASKED, body, lambda secure, _me: secure.check_masked(body))


@bp.post("/rounds/<int:round_id>/secagg/reveal")
@takes_body("device", _largest(2 * shamir.SHARE_BYTES + 16))
@device_only
@spec.validate(json=SecAggReveal, resp=Response(HTTP_202=SecAggAccepted, **_MESSAGE_ERRORS), security=DEVICE, tags=["secure"])
def reveal(round_id: int, json: SecAggReveal):
    """Phase 4: the shares this device was asked for (see ``SecAggReveal``)."""
    return _accept(round_id, MessageKind.REVEAL, encode(json), lambda secure, me: secure.check_reveal(me, json))
