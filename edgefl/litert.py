"""The LiteRT runtime of the ``Learner`` interface (``edgefl.learner``), the way a phone
runs it.

``LiteRTLearner`` trains the on-device .tflite (``export.ondevice`` writes it) through
``ai_edge_litert``'s interpreter, implementing only the runtime's operations (weights in
and out, one step, evaluation); the client update is ``Learner.client_update``, shared
with Keras. It imports no TensorFlow, directly or through ``edgefl.learner``: a device
using it carries what a phone app would.
"""

from __future__ import annotations

import numpy as np

from edgefl.learner import Learner
from edgefl.logs import native_stderr_silenced
from edgefl.wire import TensorSpec

# The on-device training file's contract, which ``export.ondevice`` writes by: its
# signatures, and its tensors under the wire format's names with "/" as "__"
# (signature keys are identifiers). ``train`` takes x, y, mask and the client
# optimizer's learning_rate, momentum and prox_mu (``edgefl.learner``'s step; a file
# written before momentum existed lacks the last two, and trains plain SGD only);
# ``set_weights`` also starts a client update (the proximal anchor, zeroed momentum);
# ``get_weights`` returns the model's weights only.
SIGNATURES = ("train", "infer", "get_weights", "set_weights")


def signature_key(wire_name: str) -> str:
    return wire_name.replace("/", "__")


def wire_name(signature_key: str) -> str:
    return signature_key.replace("__", "/")


class LiteRTLearner(Learner):
    """One interpreter (per process, or per thread of a device host), reused for every
    round; weights are set per call. It trains only its file's fixed batch size."""

    def __init__(self, tflite_model: bytes, *, threads: int = 1):
        from ai_edge_litert.interpreter import Interpreter

        with native_stderr_silenced():  # LiteRT announces its XNNPACK delegate on stderr
            self._interpreter = Interpreter(model_content=tflite_model, num_threads=threads)
            self._train = self._interpreter.get_signature_runner("train")
            self._infer = self._interpreter.get_signature_runner("infer")
            self._get_weights = self._interpreter.get_signature_runner("get_weights")
            self._set_weights = self._interpreter.get_signature_runner("set_weights")
            initial = self._get_weights()
        train_inputs = self._train.get_input_details()
        self.batch_size = int(train_inputs["x"]["shape"][0])
        self._has_client_optimizer = {"momentum", "prox_mu"} <= set(train_inputs)
        # The file's own order (its signatures sort their keys), not Keras's: without
        # TensorFlow there is no Keras model to ask, and tensors travel by name anyway.
        self.names = [wire_name(key) for key in sorted(initial)]
        self.spec = tuple(TensorSpec(wire_name(k), tuple(int(d) for d in initial[k].shape)) for k in sorted(initial))

    def set_weights(self, weights: list[np.ndarray]) -> None:
        self._set_weights(**{signature_key(n): np.asarray(w, np.float32) for n, w in zip(self.names, weights)})

    def get_weights(self) -> list[np.ndarray]:
        outputs = self._get_weights()
        return [outputs[signature_key(n)].copy() for n in self.names]

    def _padded(self, x: np.ndarray, y: np.ndarray | None = None):
        rows = len(x)
        if rows > self.batch_size:
            raise ValueError(f"a batch of {rows} exceeds the model's fixed batch of {self.batch_size}")
        pad = self.batch_size - rows
        x = np.concatenate([x, np.zeros((pad, *x.shape[1:]), np.float32)]) if pad else x
        mask = np.concatenate([np.ones(rows, np.float32), np.zeros(pad, np.float32)])
        if y is None:
            return x.astype(np.float32), mask
        y = np.concatenate([y, np.zeros(pad, y.dtype)]) if pad else y
        return x.astype(np.float32), y.astype(np.int32), mask

    def train_step(
        self, x: np.ndarray, y: np.ndarray, learning_rate: float, *, momentum: float = 0.0, prox_mu: float = 0.0
    ) -> tuple[float, float]:
        """One step of the client optimizer on one batch (at most the model's batch
        size); its mean loss and number of correct predictions, before the step."""
        x, y, mask = self._padded(x, y)
        hyper = {"learning_rate": np.float32(learning_rate)}
        if self._has_client_optimizer:
            hyper.update(momentum=np.float32(momentum), prox_mu=np.float32(prox_mu))
        elif momentum or prox_mu:
            raise ValueError("this training file predates momentum and prox_mu: it trains plain SGD only")
        out = self._train(x=x, y=y, mask=mask, **hyper)
        return float(out["loss"]), float(out["correct"])

    def logits(self, x: np.ndarray) -> np.ndarray:
        parts = []
        for start in range(0, len(x), self.batch_size):
            chunk = x[start : start + self.batch_size]
            padded, _ = self._padded(chunk)
            parts.append(self._infer(x=padded)["logits"][: len(chunk)])
        return np.concatenate(parts)

    def evaluate(self, weights: list[np.ndarray], x: np.ndarray, y: np.ndarray) -> dict[str, float]:
        self.set_weights(weights)
        logits = self.logits(x)
        shifted = logits - logits.max(axis=1, keepdims=True)
        log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
        return {"loss": float(-log_probs[np.arange(len(y)), y].mean()), "accuracy": float((logits.argmax(1) == y).mean())}
