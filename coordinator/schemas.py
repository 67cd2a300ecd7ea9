"""The API's request and response bodies as pydantic models: spectree validates
requests against them and writes them into the OpenAPI document."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

_MAX = 10**9


class DeviceRegistration(BaseModel):
    device_id: str
    token: str = Field(description="Bearer token for every device call; the coordinator keeps only its hash")


class Task(BaseModel):
    round_id: int
    round_number: int
    model: str
    checkpoint_sha256: str = Field(description="GET /v1/checkpoints/{sha256} for the weights to train from")
    epochs: int
    batch_size: int
    learning_rate: float
    seconds_left: float = Field(description="Until the round's deadline")
    quantization_bits: int | None = Field(
        description="Upload the update quantized to this many bits per value (edgefl.compression); null: float32"
    )


class CheckinAnswer(BaseModel):
    status: Literal["task", "wait", "finished"]
    task: Task | None = None
    retry_after: float | None = Field(None, description="Seconds to wait before the next check-in (also the Retry-After header)")
    reason: Literal["between_rounds", "reported", "cohort_full", "paused", "deferred", "run_finished", "run_stopped"] | None = (
        Field(
            None,
            description="deferred: this device's record keeps it out of the round for now (it missed recent rounds,"
            " or the round's seats are kept for devices that have reported before); run_finished, run_stopped: why there"
            " is no more work",
        )
    )


class UpdateAccepted(BaseModel):
    round_id: int
    accepted: bool
    reports: int = Field(description="Updates the round holds now")


class RunControlled(BaseModel):
    run: Literal["running", "paused", "stopped"]


class ConfigChange(BaseModel):
    """Settings an operator may change mid-run (at least one); anything else is what the
    run *is*. Whether the new values fit together and fit the run so far is checked
    against the run (409 config_conflict)."""

    model_config = ConfigDict(extra="forbid", strict=True, json_schema_extra={"minProperties": 1})
    rounds: int = Field(None, ge=1, le=_MAX)
    target_reports: int = Field(None, ge=1, le=_MAX)
    min_reports: int = Field(None, ge=1, le=_MAX)
    over_selection: float = Field(None, ge=1.0, le=_MAX, allow_inf_nan=False)
    round_timeout_s: float = Field(None, gt=0, le=_MAX, allow_inf_nan=False)
    epochs: int = Field(None, ge=1, le=_MAX)
    batch_size: int = Field(None, ge=1, le=_MAX)
    client_lr: float = Field(None, gt=0, le=_MAX, allow_inf_nan=False)

    @model_validator(mode="after")
    def _names_a_setting(self) -> ConfigChange:
        if not self.model_fields_set:
            raise ValueError("name at least one setting to change")
        return self


class RunConfigBody(BaseModel):
    model: str
    dataset: str
    rounds: int
    target_reports: int
    min_reports: int
    over_selection: float
    round_timeout_s: float
    epochs: int
    batch_size: int
    client_lr: float
    aggregator: str
    server_optimizer: str
    server_lr: float
    server_momentum: float
    dp_noise_multiplier: float
    dp_clip: float
    compression_bits: int
    seed: int


class ConfigChanged(BaseModel):
    config: RunConfigBody
