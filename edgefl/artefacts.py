"""The phone artefacts' file names: what ``edgefl export`` writes and the coordinator's
publisher picks up to serve, named once here so neither room hard-codes the other's.
"""

from __future__ import annotations

MODEL_CARD = "model_card.json"
PHONE_VARIANT = "int8"  # the inference file served as /v1/models/latest.tflite


def inference_file(model: str, variant: str) -> str:
    return f"{model}_{variant}.tflite"


def training_file(model: str) -> str:
    """The on-device training file (``export.ondevice``'s rewrite, signatures in ``edgefl.litert``)."""
    return f"{model}_train.tflite"
