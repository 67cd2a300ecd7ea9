"""TensorFlow Lite files for phones, each checked against the Keras model it came from.

Each variant is converted by TFLite's converter, then run by ``tf.lite.Interpreter``
on the coordinator's held-out test split, so the model card reports what the file
does, not what it should do. The int8 file is calibrated on that held-out split
(never on device data) and keeps float32 input and output, so the app feeds every
variant the same way.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Callable

import numpy as np

VARIANTS = ("float32", "int8")
_CALIBRATION_EXAMPLES = 200


@dataclass(frozen=True)
class VariantReport:
    kind: str
    file: str
    bytes: int
    sha256: str
    accuracy: float
    top1_agreement: float
    max_abs_logit_diff: float

    def to_json(self) -> dict:
        return dict(self.__dict__)


def convert(model, kind: str, calibration_x: np.ndarray) -> bytes:
    import tensorflow as tf

    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    if kind == "int8":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]

        def representative() -> Callable:
            for image in calibration_x[:_CALIBRATION_EXAMPLES]:
                yield [image[None].astype(np.float32)]

        converter.representative_dataset = representative
    elif kind != "float32":
        raise ValueError(f"unknown variant {kind!r}; choose one of {', '.join(VARIANTS)}")
    return converter.convert()


def predict(tflite_model: bytes, x: np.ndarray) -> np.ndarray:
    """Logits for ``x`` from the TFLite interpreter, one invoke for the whole batch."""
    import tensorflow as tf

    interpreter = tf.lite.Interpreter(model_content=tflite_model)
    input_index = interpreter.get_input_details()[0]["index"]
    interpreter.resize_tensor_input(input_index, list(x.shape))
    interpreter.allocate_tensors()
    interpreter.set_tensor(input_index, x.astype(np.float32))
    interpreter.invoke()
    return interpreter.get_tensor(interpreter.get_output_details()[0]["index"]).copy()


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
    )
