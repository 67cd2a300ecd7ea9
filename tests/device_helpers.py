"""What the device tests share: a learner without a runtime, learners to lend, and a
client that answers from a script. Not a test module: test modules import this, never
each other."""

from __future__ import annotations

import hashlib

import numpy as np

from edgefl import wire
from edgefl.client import Traffic, TrainingModel
from edgefl.datasets import Split
from edgefl.learner import Learner
from edgefl.protocol import CheckinAnswer, Task, UpdateAccepted
from edgefl.wire import TensorSpec

TINY = (TensorSpec("w", (3,)),)


class TinyLearner(Learner):
    """A learner without a runtime: one weight vector, every step adds 0.1."""

    names = ["w"]
    spec = TINY

    def __init__(self, batch_size: int | None = None):
        self.batch_size = batch_size
        self.weights = [np.zeros(3, np.float32)]

    def set_weights(self, weights):
        self.weights = [np.array(w, np.float32) for w in weights]

    def get_weights(self):
        return [w.copy() for w in self.weights]

    def train_step(self, x, y, learning_rate):
        self.weights = [w + np.float32(0.1) for w in self.weights]
        return 1.0, float(len(y))

    def evaluate(self, weights, x, y):
        return {"loss": 1.0, "accuracy": 0.5}


class TinyLearners:
    def __init__(self, keras: Learner | None = None):
        self.keras_learner = keras or TinyLearner()
        self.built: list[int] = []

    def keras(self, model):
        return self.keras_learner

    def litert(self, training_file):
        self.built.append(training_file.batch_size)
        return TinyLearner(training_file.batch_size)

    def decoded(self, sha256, data, learner):
        return wire.decode(data, learner.spec)[0]


CHECKPOINT = wire.encode(["w"], [np.ones(3, np.float32)])
SHA = hashlib.sha256(CHECKPOINT).hexdigest()


def task(round_id=1, batch_size=10, codec="float32", sha=SHA) -> CheckinAnswer:
    return CheckinAnswer(
        status="task",
        task=Task(
            round_id=round_id,
            round_number=round_id,
            model="cnn_small",
            checkpoint_sha256=sha,
            epochs=1,
            batch_size=batch_size,
            learning_rate=0.1,
            seconds_left=60,
            codec=codec,
        ),
    )


WAIT = CheckinAnswer(status="wait", retry_after=2.5, reason="cohort_full")
FINISHED = CheckinAnswer(status="finished", reason="run_finished")


class ScriptedClient:
    """CoordinatorClient's calls, answered from a script."""

    def __init__(self, answers, uploads=(), training_batches=(10,)):
        self.answers, self.uploads, self.batches = list(answers), list(uploads), list(training_batches)
        self.statuses: list = []  # RunStatus answers, for an idle device's questions
        self.traffic = Traffic()
        self.network_faults = 0
        self.bodies: list[bytes] = []
        self.downloads: list[str] = []

    def register(self, secret=None):
        return "device-1"

    def status(self):
        return self.statuses.pop(0)

    def checkin(self):
        return self.answers.pop(0)

    def download_checkpoint(self, sha256):
        self.downloads.append("checkpoint")
        self.traffic.bytes_down += len(CHECKPOINT)
        return CHECKPOINT

    def download_training_model(self, cached=None):
        self.downloads.append("training file")
        batch = self.batches.pop(0) if len(self.batches) > 1 else self.batches[0]
        return TrainingModel(f"file-{batch}", b"tflite", batch)

    def upload_update(self, round_id, body):
        self.bodies.append(body)
        outcome = self.uploads.pop(0) if self.uploads else None
        if outcome is not None:
            raise outcome
        self.traffic.bytes_up += len(body)
        return UpdateAccepted(round_id=round_id, accepted=True, reports=1)


def shard(n=20) -> Split:
    rng = np.random.default_rng(0)
    return Split(rng.random((n, 28, 28, 1), dtype=np.float32), rng.integers(0, 10, n))
