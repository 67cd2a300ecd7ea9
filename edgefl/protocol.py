"""The /v1 protocol's messages, typed: what devices, operators and the coordinator say
to each other.

One declaration serves every side. The coordinator builds its answers from these
models and spectree writes them into ``/v1/openapi.json``; the devices, the CLI, the
launcher and the benchmarks parse what they receive with the same models instead of
reading raw dicts. Answers ignore fields they do not know (an older client keeps
working against a newer coordinator); request bodies refuse them.

The run configuration's bodies (``RunConfigBody``, ``ConfigChange``) are derived from
``edgefl.config.RunConfig``'s declarations, so a new setting reaches the API without
being spelled out again.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model, model_validator

from edgefl.config import run_settings


class RoundStatus(StrEnum):
    """Where a round is in its life (``coordinator.lifecycle`` says what follows what)."""

    OPEN = "open"  # selecting devices and collecting their messages
    AGGREGATING = "aggregating"  # collection closed; the update is being computed
    COMMITTED = "committed"  # its checkpoint is the newest model
    ABANDONED = "abandoned"  # given up, with a recorded reason; a new round retries its model


class RunStatusName(StrEnum):
    RUNNING = "running"
    PAUSED = "paused"
    FINISHED = "finished"
    STOPPED = "stopped"


class Answer(BaseModel):
    """A message the coordinator sends: unknown fields are ignored."""

    model_config = ConfigDict(extra="ignore")


# --- devices -----------------------------------------------------------------------


class DeviceRegistration(Answer):
    device_id: str
    token: str = Field(description="Bearer token for every device call; the coordinator keeps only its hash")


class Task(Answer):
    """What a selected device is told to do."""

    round_id: int
    round_number: int
    model: str
    checkpoint_sha256: str = Field(description="GET /v1/checkpoints/{sha256} for the weights to train from")
    epochs: int
    batch_size: int
    learning_rate: float
    momentum: float = Field(0.0, description="Client SGD's momentum (0: plain SGD); the accumulator starts at 0 each round")
    prox_mu: float = Field(0.0, description="FedProx's proximal strength: mu/2 |w - w_global|^2 is added to the loss")
    seconds_left: float = Field(description="Until the round's deadline")
    codec: str = Field(
        "float32", description="How the device encodes its update (edgefl.codecs): float32, or quantized:<bits> per value"
    )
    quantization_bits: int | None = Field(
        None, description="The codec's bits, for devices of the release before codecs (null: float32)", deprecated=True
    )
    secure: SecureTask | None = Field(None, description="Set in a secure round: the update goes through SecAgg+, not an upload")

    @model_validator(mode="before")
    @classmethod
    def _codec_of_an_older_coordinator(cls, data: Any) -> Any:
        """A coordinator of the release before codecs named only the bits."""
        if isinstance(data, dict) and "codec" not in data and data.get("quantization_bits"):
            return {**data, "codec": f"quantized:{data['quantization_bits']}"}
        return data


class SecureTask(Answer):
    """The bounds of TFF's secure weighted mean (``SecureSumFactory``): the device
    clips and quantizes its update times its example count within +-value_bound and
    its example count within [0, weight_bound] (``edgefl.secagg.quantize``)."""

    value_bound: float
    weight_bound: float


Task.model_rebuild()

WAIT_REASONS = ("between_rounds", "reported", "cohort_full", "paused", "deferred", "run_finished", "run_stopped")


class CheckinAnswer(Answer):
    status: Literal["task", "wait", "finished"]
    task: Task | None = None
    retry_after: float | None = Field(None, description="Seconds to wait before the next check-in (also the Retry-After header)")
    reason: str | None = Field(  # a str, not the known reasons: a newer coordinator may give others
        None,
        description=f"One of {', '.join(WAIT_REASONS)}. deferred: this device's record keeps it out of the round for"
        " now (it missed recent rounds, or the round's seats are kept for devices that have reported before);"
        " run_finished, run_stopped: why there is no more work",
    )
    held_s: float | None = Field(
        None, description="Seconds the lobby held this check-in for the next round (the rest of its latency is service)"
    )

    @property
    def wanted_next(self) -> bool:
        """A ``wait`` for a device the next round will want (the lobby holds it)."""
        return self.status == "wait" and self.reason in ("between_rounds", "reported")


class UpdateAccepted(Answer):
    round_id: int
    accepted: bool
    reports: int = Field(description="Updates the round holds now")


# --- secure aggregation (SecAgg+, edgefl.secagg) ------------------------------------

_HEX_KEY = r"^[0-9a-f]{64}$"  # an X25519 public key


class SecAggRequest(BaseModel):
    """A device's SecAgg+ message: unknown fields are refused."""

    model_config = ConfigDict(extra="forbid")


class SecAggKeys(SecAggRequest):
    """Phase 1, advertise keys: the device's two X25519 public keys (hex)."""

    encryption: str = Field(pattern=_HEX_KEY, description="Agrees the keys that seal shares between two devices")
    masking: str = Field(pattern=_HEX_KEY, description="Agrees the pairwise mask seeds")


class SecAggShares(SecAggRequest):
    """Phase 2, share keys: for each neighbour that advertised, by its index, the
    sealed pair of Shamir shares (self-mask seed, mask key) only it can open (hex)."""

    shares: dict[int, str] = Field(max_length=10_000)


class SecAggReveal(SecAggRequest):
    """Phase 4, unmask: by owner index, the share of the self-mask seed of each
    neighbour whose masked input arrived (``seeds``), and of the mask key of each that
    shared keys but sent no input (``keys``); never both for one neighbour."""

    seeds: dict[int, str] = Field(max_length=10_000)
    keys: dict[int, str] = Field(max_length=10_000)


class SecAggParams(Answer):
    """A secure round's public parameters, fixed when its keys phase closes
    (``edgefl.secagg.protocol.RoundParams``), and the asking device's index in it."""

    index: int
    devices: int
    size: int = Field(description="Entries of the masked input")
    bits: int = Field(description="The sum is taken modulo 2^bits; each entry travels in ceil(bits / 8) bytes")
    degree: int
    threshold: int
    graph_seed: int = Field(description="Seeds the neighbour graph (edgefl.secagg.graph.neighbours)")


class SecAggSeen(SecAggRequest):
    """``GET /v1/rounds/{id}/secagg``'s query: the phase the device has answered last."""

    seen: str | None = Field(None, max_length=40, description="Hold the answer while the round is still in this phase")


class SecAggView(Answer):
    """What one device of a secure round needs from the coordinator for the phase the
    round is in: only about its own neighbours."""

    round_id: int
    status: RoundStatus
    phase: str
    retry_after: float = Field(description="Seconds before asking again while the phase is unchanged")
    params: SecAggParams | None = Field(None, description="From the share-keys phase on")
    keys: dict[int, SecAggKeys] = Field({}, description="The public keys of this device's neighbours that advertised")
    shares: dict[int, str] = Field({}, description="From the masked-input phase on: sealed shares for this device, by sender")
    masked: list[int] = Field([], description="In the unmask phase: this device's neighbours whose masked input arrived")


class SecAggAccepted(Answer):
    round_id: int
    phase: str
    messages: int = Field(description="Messages the phase holds now")


# --- operators ---------------------------------------------------------------------


def _field_of(name: str, annotation: type, setting, *, optional: bool, checked: bool = True) -> tuple:
    """A pydantic field for a declared setting: with its bounds and choices in a request
    (``checked``), without them in an answer (a newer coordinator may allow more)."""
    if not checked:
        return (annotation, Field(description=setting.help))
    bounds: dict[str, Any] = {}
    if setting.low is not None:
        bounds["gt" if setting.above_low else "ge"] = setting.low
    if setting.high is not None:
        bounds["lt" if setting.below_high else "le"] = setting.high
    if annotation is float:
        bounds["allow_inf_nan"] = False
    if setting.choices:
        annotation = Literal[setting.choices]  # type: ignore[valid-type]
    return (annotation, Field(None if optional else ..., description=setting.help, **bounds))


RunConfigBody = create_model(
    "RunConfigBody",
    __base__=Answer,
    __doc__="A run's whole configuration (edgefl.config.RunConfig).",
    **{name: _field_of(name, annotation, setting, optional=False, checked=False) for name, annotation, setting in run_settings()},
)


class _ChangeBase(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, json_schema_extra={"minProperties": 1})

    @model_validator(mode="after")
    def _names_a_setting(self):
        if not self.model_fields_set:
            raise ValueError("name at least one setting to change")
        return self


ConfigChange = create_model(
    "ConfigChange",
    __base__=_ChangeBase,
    __doc__="Settings an operator may change mid-run (at least one); anything else is what the run *is*. Whether"
    " the new values fit together and fit the run so far is checked against the run (409 config_conflict).",
    **{
        name: _field_of(name, annotation, setting, optional=True)
        for name, annotation, setting in run_settings()
        if setting.mutable
    },
)


class ConfigChanged(Answer):
    config: RunConfigBody  # type: ignore[valid-type]


class RunControlled(Answer):
    run: RunStatusName


class RoundRecord(Answer):
    """Everything the store says of one round (``GET /v1/rounds``)."""

    id: int
    number: int
    status: RoundStatus
    phase: str | None = Field(None, description="The phase of its plan it is in, or closed in (coordinator.lifecycle)")
    selected: int = Field(description="Devices given the round's task")
    reported: int = Field(description="Updates it holds")
    dropped: int | None = Field(description="Selected and never heard from by its close (null while open)")
    late: int = Field(description="Devices that reported after it closed")
    rejected: dict[str, int] = Field(description="Refused uploads, by reason")
    bytes_down: int
    bytes_up: int
    phase_seconds: dict[str, float | None]
    opened_at: float
    deadline_at: float
    closed_at: float | None
    committed_at: float | None
    evaluated_at: float | None
    abandon_reason: str | None
    abandon_detail: str | None
    failures: int
    metrics: dict[str, Any] | None = Field(
        description="Central evaluation, aggregation measurements, devices' reports, a DP run's privacy spent"
    )


class RoundsAnswer(Answer):
    rounds: list[RoundRecord]


class RoundInProgress(RoundRecord):
    target_reports: int
    seconds_left: float


class RoundSummary(Answer):
    """One evaluated round, as ``/v1/status``'s history shows it."""

    round: int
    accuracy: float | None
    loss: float | None
    selected: int
    reported: int
    dropped: int | None
    late: int
    rejected: int
    bytes_down: int
    bytes_up: int
    seconds: float
    aggregation_seconds: float | None
    phase_seconds: dict[str, float | None]
    personalization: dict[str, Any] | None = None
    privacy: dict[str, float] | None = None
    bytes_up_float32: int | None = None
    upload_bits: int | None = None
    measurements: dict[str, float] | None = Field(None, description="The aggregator's own (TFF's measurements)")

    @classmethod
    def of(cls, record: RoundRecord) -> RoundSummary:
        metrics = record.metrics or {}
        return cls(
            round=record.number,
            accuracy=metrics.get("accuracy"),
            loss=metrics.get("loss"),
            selected=record.selected,
            reported=record.reported,
            dropped=record.dropped,
            late=record.late,
            rejected=sum(record.rejected.values()),
            bytes_down=record.bytes_down,
            bytes_up=record.bytes_up,
            seconds=(record.committed_at or record.opened_at) - record.opened_at,
            aggregation_seconds=metrics.get("aggregation_s"),
            phase_seconds=record.phase_seconds,
            personalization=metrics.get("personalization"),
            privacy=metrics.get("privacy"),
            bytes_up_float32=metrics.get("bytes_up_float32"),
            upload_bits=metrics.get("upload_bits"),
            measurements=metrics.get("measurements"),
        )


class AbandonedRound(Answer):
    round: int
    id: int
    reason: str | None
    detail: str | None
    at: float | None


class ConfigChangeRecord(Answer):
    changes: dict[str, Any]
    changed_at: float


class RunInfo(Answer):
    status: RunStatusName
    config: RunConfigBody  # type: ignore[valid-type]
    config_changes: list[ConfigChangeRecord]
    created_at: float
    finished_at: float | None

    @property
    def over(self) -> bool:
        return self.status in (RunStatusName.FINISHED, RunStatusName.STOPPED)


class ModelInfo(Answer):
    version: int
    sha256: str
    size: int
    url: str


class RunStatus(Answer):
    """``GET /v1/status``: the run, its newest model, the round in progress, and every
    evaluated round's summary (``run`` is null before a run starts)."""

    run: RunInfo | None
    model: ModelInfo | None = None
    round: RoundInProgress | None = None
    devices: int = 0
    history: list[RoundSummary] = []
    abandoned: list[AbandonedRound] = []
