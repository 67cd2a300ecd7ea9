"""The phone artefacts' file names: what ``edgefl export`` writes and the coordinator's
publisher picks up to serve, named once here so neither room hard-codes the other's.
"""

from __future__ import annotations

import re
from pathlib import PurePath

MODEL_CARD = "model_card.json"
PHONE_VARIANT = "int8"  # the inference file served as /v1/models/latest.tflite


def model_stem(model: str) -> str:
    """A file name's stem for a model reference (``edgefl.models``): a built-in's name,
    a ``.keras`` file's stem, or a builder's module and function (``mymodels_build``)."""
    if model.endswith(".keras"):
        model = PurePath(model).stem
    elif ":" in model:
        source, _, function = model.rpartition(":")
        module = PurePath(source).stem if source.endswith(".py") else source.rsplit(".", 1)[-1]
        model = f"{module}_{function}"
    return re.sub(r"[^A-Za-z0-9_.-]", "_", model)


def inference_file(model: str, variant: str) -> str:
    return f"{model_stem(model)}_{variant}.tflite"


def training_file(model: str) -> str:
    """The on-device training file (``export.ondevice``'s rewrite, signatures in ``edgefl.litert``)."""
    return f"{model_stem(model)}_train.tflite"


def keras_file(model: str) -> str:
    """The final model for Python users: ``tf.keras.models.load_model`` reads it."""
    return f"{model_stem(model)}.keras"
