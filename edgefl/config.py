"""Run configuration: what a federated run trains, and how rounds are paced.

One frozen dataclass, stored as JSON with the run so that a restarted coordinator
resumes with exactly the configuration it started with.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields

from edgefl.compression import BITS
from edgefl.datasets import DATASET_NAMES
from edgefl.models import MODEL_NAMES

SERVER_OPTIMIZERS = ("sgd", "sgdm", "adam")  # FedAvg, FedAvgM, FedAdam
AGGREGATORS = ("mean", "robust", "dp_adaptive", "dp_fixed", "compressed")


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    model: str = "cnn"
    dataset: str = "digits"
    rounds: int = 10
    target_reports: int = 10  # a round closes as soon as this many updates arrived
    min_reports: int = 8  # ...or at its deadline if at least this many did
    over_selection: float = 1.3  # cohort = ceil(target_reports * over_selection)
    round_timeout_s: float = 120.0
    epochs: int = 1
    batch_size: int = 10
    client_lr: float = 0.05
    aggregator: str = "mean"
    server_optimizer: str = "sgd"
    server_lr: float = 1.0  # SGD at 1.0 on the mean delta is plain FedAvg
    server_momentum: float = 0.9  # sgdm only
    dp_noise_multiplier: float = 1.0  # dp_* only: noise stddev over the clip norm
    dp_clip: float = 0.1  # dp_fixed's L2 clip norm of each update
    compression_bits: int = 8  # compressed only: bits per value of a quantized upload
    seed: int = 0  # initial weights

    def __post_init__(self) -> None:
        problems = []
        if self.model not in MODEL_NAMES:
            problems.append(f"model must be one of {', '.join(MODEL_NAMES)}")
        if self.dataset not in DATASET_NAMES:
            problems.append(f"dataset must be one of {', '.join(DATASET_NAMES)}")
        if self.server_optimizer not in SERVER_OPTIMIZERS:
            problems.append(f"server_optimizer must be one of {', '.join(SERVER_OPTIMIZERS)}")
        if self.aggregator not in AGGREGATORS:
            problems.append(f"aggregator must be one of {', '.join(AGGREGATORS)}")
        if not 0 <= self.server_momentum < 1:
            problems.append("server_momentum must be at least 0 and below 1")
        if not self.dp_noise_multiplier >= 0 or not self.dp_clip > 0:
            problems.append("dp_noise_multiplier must not be negative and dp_clip must be positive")
        elif self.aggregator == "dp_adaptive" and self.dp_noise_multiplier >= 0.1 * self.target_reports:
            # TFF's adaptive clipping spends part of the noise on its clip estimate, whose
            # noise is 0.05 x the clients per round: it must stay above half the total.
            problems.append("dp_adaptive needs target_reports above 10 x dp_noise_multiplier")
        if self.compression_bits not in BITS:
            problems.append(f"compression_bits must be one of {', '.join(map(str, BITS))}")
        for name in ("rounds", "target_reports", "min_reports", "epochs", "batch_size"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be at least 1")
        if self.min_reports > self.target_reports:
            problems.append("min_reports must not exceed target_reports")
        if self.over_selection < 1.0:
            problems.append("over_selection must be at least 1.0")
        for name in ("round_timeout_s", "client_lr", "server_lr"):
            if not getattr(self, name) > 0:
                problems.append(f"{name} must be positive")
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def upload_bits(self) -> int | None:
        """Bits per value devices quantize their updates to; None: they send float32."""
        return self.compression_bits if self.aggregator == "compressed" else None

    @property
    def cohort_size(self) -> int:
        return math.ceil(self.target_reports * self.over_selection)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "RunConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in json.loads(text).items() if k in known})
