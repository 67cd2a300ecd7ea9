"""TensorFlow Lite files for phones, each checked against the Keras model it came from.

Each variant is converted by TFLite's converter, then run by the standalone LiteRT
interpreter (what a phone runs, not TensorFlow's copy of it) on the coordinator's
held-out test split, so the model card reports what the file does, not what it should
do. Quantised variants keep float32 input and output, so an app feeds every variant
the same way; the int8 file is calibrated on that held-out split, never on device data.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass

import numpy as np

VARIANTS = ("float32", "float16", "dynamic", "int8")
_CALIBRATION_EXAMPLES = 200
_LATENCY_RUNS = 200


@dataclass(frozen=True)
class VariantReport:
    kind: str
    file: str
    bytes: int
    sha256: str
    accuracy: float
    top1_agreement: float
    max_abs_logit_diff: float
    latency_ms: float  # per image at batch 1, one thread, median

    def to_json(self) -> dict:
        return dict(self.__dict__)


def convert(model, kind: str, calibration_x: np.ndarray) -> bytes:
    import tensorflow as tf

    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    if kind == "float16":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.target_spec.supported_types = [tf.float16]
    elif kind == "dynamic":  # int8 weights, float activations: no calibration data needed
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    elif kind == "int8":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.representative_dataset = lambda: (
            [image[None].astype(np.float32)] for image in calibration_x[:_CALIBRATION_EXAMPLES]
        )
    elif kind != "float32":
        raise ValueError(f"unknown variant {kind!r}; choose one of {', '.join(VARIANTS)}")
    return converter.convert()


def _interpreter(tflite_model: bytes):
    from ai_edge_litert.interpreter import Interpreter

    return Interpreter(model_content=tflite_model, num_threads=1)


def predict(tflite_model: bytes, x: np.ndarray) -> np.ndarray:
    """Logits for ``x`` from LiteRT, one invoke for the whole batch."""
    interpreter = _interpreter(tflite_model)
    input_index = interpreter.get_input_details()[0]["index"]
    interpreter.resize_tensor_input(input_index, list(x.shape))
    interpreter.allocate_tensors()
    interpreter.set_tensor(input_index, x.astype(np.float32))
    interpreter.invoke()
    return interpreter.get_tensor(interpreter.get_output_details()[0]["index"]).copy()


def latency_ms(tflite_model: bytes, x: np.ndarray) -> float:
    """Median milliseconds of one invoke on one image, as an app classifies a drawing."""
    interpreter = _interpreter(tflite_model)
    interpreter.allocate_tensors()
    input_index = interpreter.get_input_details()[0]["index"]
    times = []
    for i in range(_LATENCY_RUNS + 10):
        interpreter.set_tensor(input_index, x[i % len(x)][None].astype(np.float32))
        start = time.perf_counter()
        interpreter.invoke()
        times.append(time.perf_counter() - start)
    return float(np.median(times[10:]) * 1e3)  # the first invokes warm caches up


def check_variant(
    kind: str, file_name: str, tflite_model: bytes, x: np.ndarray, y: np.ndarray, keras_logits: np.ndarray
) -> VariantReport:
    logits = predict(tflite_model, x)
    predicted = logits.argmax(1)
    return VariantReport(
        kind=kind,
        file=file_name,
        bytes=len(tflite_model),
        sha256=hashlib.sha256(tflite_model).hexdigest(),
        accuracy=float((predicted == y).mean()),
        top1_agreement=float((predicted == keras_logits.argmax(1)).mean()),
        max_abs_logit_diff=float(np.abs(logits - keras_logits).max()),
        latency_ms=latency_ms(tflite_model, x),
    )
