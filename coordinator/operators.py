"""What operators call on the /v1 blueprint: the run's status and round records, and,
with the admin token, pause, resume, stop and configuration changes. (Devices' calls
are in ``coordinator.api``, whose blueprint these views join when this module is
imported by ``create_app``.)
"""

from __future__ import annotations

import functools
import time
from dataclasses import asdict

from flask import current_app, request
from spectree import Response

from coordinator import access, records, rounds, run_control
from coordinator.api import bp, errors, get_db, get_store, require_run
from coordinator.errors import ApiError
from coordinator.openapi import ADMIN, spec
from edgefl.protocol import (
    AbandonedRound,
    ConfigChange,
    ConfigChanged,
    ModelInfo,
    RoundInProgress,
    RoundRecord,
    RoundsAnswer,
    RoundStatus,
    RoundSummary,
    RunControlled,
    RunInfo,
    RunStatus,
)


def admin_only(view):
    """Operator endpoints need the admin token (checked before the body is validated),
    and are off without one configured."""

    @functools.wraps(view)
    def guarded(*args, **kwargs):
        access.require_admin(request.headers.get("Authorization"), current_app)
        return view(*args, **kwargs)

    return guarded


@bp.post("/admin/<any(pause, resume, stop):action>")
@admin_only
@spec.validate(resp=Response(HTTP_200=RunControlled, **errors(401, 403, 404, 409, 503)), security=ADMIN, tags=["operators"])
def control(action: str):
    """Pause the run (no new tasks), resume it, or stop it for good."""
    db = get_db()
    require_run(db)
    with get_store().transaction(db):
        rejection = run_control.control_run(db, action, time.time())
        if rejection:
            raise ApiError(rejection.status, rejection.code, rejection.detail)
    current_app.extensions["edgefl.lobby"].notify()  # held check-ins learn of it now
    return RunControlled(run=rounds.run_status(db))


@bp.post("/admin/config")
@access.takes_body("admin", access.JSON_BODY_BYTES)
@admin_only
@spec.validate(
    json=ConfigChange,
    resp=Response(HTTP_200=ConfigChanged, **errors(400, 401, 403, 409, 415, 422, 503)),
    security=ADMIN,
    tags=["operators"],
)
def change_config(json: ConfigChange):
    """Change settings of the run in progress; recorded, and in effect at once."""
    db = get_db()
    require_run(db)
    with get_store().transaction(db):
        changed = run_control.change_config(db, json.model_dump(exclude_unset=True), time.time())
        if isinstance(changed, rounds.Rejection):
            raise ApiError(changed.status, changed.code, changed.detail)
    current_app.extensions["edgefl.lobby"].notify()  # a bigger cohort may take held devices now
    return ConfigChanged(config=asdict(changed))


@bp.get("/status")
@spec.validate(resp=Response(HTTP_200=RunStatus), tags=["operators"])
def status():
    """The run, its newest model, the round in progress and every evaluated round's summary."""
    db = get_db()
    with get_store().reading(db):
        config = rounds.run_config(db)
        if config is None:
            return RunStatus(run=None)
        run = db.execute("SELECT * FROM run WHERE id = 1").fetchone()
        latest = rounds.latest_checkpoint(db)
        history = [RoundRecord(**r) for r in records.history(db)]
        active = rounds.active_round(db)
        (devices,) = db.execute("SELECT COUNT(*) FROM devices").fetchone()
        changes = records.config_changes(db)
    current = None
    if active is not None:
        record = next(r for r in history if r.id == active["id"])
        current = RoundInProgress(
            **record.model_dump(),
            target_reports=config.target_reports,
            seconds_left=max(0.0, active["deadline_at"] - time.time()),
        )
    return RunStatus(
        run=RunInfo(
            status=run["status"],
            config=asdict(config),
            config_changes=changes,
            created_at=run["created_at"],
            finished_at=run["finished_at"],
        ),
        model=ModelInfo(
            version=latest["version"], sha256=latest["sha256"], size=latest["size"], url=f"/v1/checkpoints/{latest['sha256']}"
        ),
        round=current,
        devices=devices,
        history=[RoundSummary.of(r) for r in history if r.evaluated_at is not None],
        abandoned=[
            AbandonedRound(round=r.number, id=r.id, reason=r.abandon_reason, detail=r.abandon_detail, at=r.closed_at)
            for r in history
            if r.status == RoundStatus.ABANDONED
        ],
    )


@bp.get("/rounds")
@spec.validate(resp=Response(HTTP_200=RoundsAnswer), tags=["operators"])
def list_rounds():
    """Every round's full record."""
    return RoundsAnswer(rounds=records.history(get_db()))
