"""``edgefl export``: a global checkpoint becomes .tflite files (inference variants and
the on-device training model) and a model card."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from edgefl.artefacts import MODEL_CARD, inference_file, keras_file, training_file
from edgefl.datasets import load_dataset
from edgefl.models import build_model
from export.ondevice import unsupported_layer
from export.tflite import VARIANTS, check_variant, convert
from export.trainable import export_training_model


def export_checkpoint(
    *,
    weights: Sequence[np.ndarray],
    model_name: str,
    dataset: str,
    out_dir: Path,
    checkpoint_sha256: str,
    round_number: int | None,
    variants: Sequence[str] = VARIANTS,
    train_batch: int | None = None,
) -> dict:
    """Write one .tflite per variant, the training model if ``train_batch`` is given (and
    the model is within the on-device layer set: else the card's ``training.refused``
    says which layer is not), the ``.keras`` model and ``model_card.json``; return the card."""
    import tensorflow as tf

    out_dir.mkdir(parents=True, exist_ok=True)
    data = load_dataset(dataset)
    test = data.test
    model = build_model(model_name, dataset)
    model.set_weights(list(weights))
    model.save(out_dir / keras_file(model_name))
    keras_logits = model.predict(test.x, batch_size=256, verbose=0)
    reports = []
    for kind in variants:
        tflite_model = convert(model, kind, test.x)
        file_name = inference_file(model_name, kind)
        (out_dir / file_name).write_bytes(tflite_model)
        reports.append(check_variant(kind, file_name, tflite_model, test.x, test.y, keras_logits))
    training = None
    if train_batch is not None and (refused := unsupported_layer(model)):
        training = {"refused": refused, "batch_size": train_batch}
    elif train_batch is not None:
        train_model, training = export_training_model(model_name, dataset, weights, train_batch, test.x, test.y)
        training["file"] = training_file(model_name)
        (out_dir / training["file"]).write_bytes(train_model)
    card = {
        "model": model_name,
        "parameters": int(model.count_params()),
        "round": round_number,
        "checkpoint_sha256": checkpoint_sha256,
        "keras_file": keras_file(model_name),
        "input": {
            "shape": [1, *model.input_shape[1:]],
            "dtype": "float32",
            "scaling": "grey level in [0, 1], 0 = background (ink towards 1), as the dataset's loader normalises it",
        },
        "output": {"shape": [1, data.num_classes], "dtype": "float32", "meaning": "logits; argmax is the label"},
        "labels": list(data.label_names),
        "evaluation": {
            "dataset": dataset,
            "split": "test (held out by the coordinator; never on a device)",
            "examples": len(test),
            "keras_accuracy": float((keras_logits.argmax(1) == test.y).mean()),
        },
        "files": [r.to_json() for r in reports],
        "training": training,
        "tensorflow": tf.__version__,
    }
    (out_dir / MODEL_CARD).write_text(json.dumps(card, indent=2))
    return card
