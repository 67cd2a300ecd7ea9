"""``edgefl export``'s acceptance lines, on a model trained here: every variant agrees
with Keras, int8 is small and keeps the accuracy, the training file is builtin-only."""

from __future__ import annotations

import json

import pytest

from edgefl.datasets import load_dataset


@pytest.fixture(scope="module")
def exported(tmp_path_factory, small_parts):
    from edgefl.artefacts import MODEL_CARD
    from edgefl.models import build_model
    from export import export_checkpoint

    learner = small_parts[0]
    train = load_dataset("digits").train
    weights = build_model("cnn_small", "digits", seed=0).get_weights()  # not the shared learner's: other tests leave theirs in it
    for epoch in range(6):
        result = learner.client_update(weights, train.x, train.y, epochs=1, batch_size=32, learning_rate=0.1, seed=epoch)
        weights = [w + d for w, d in zip(weights, result.delta)]
    out = tmp_path_factory.mktemp("export")
    card = export_checkpoint(
        weights=weights,
        model_name="cnn_small",
        dataset="digits",
        out_dir=out,
        checkpoint_sha256="0" * 64,
        round_number=6,
        train_batch=10,
    )
    assert json.loads((out / MODEL_CARD).read_text()) == card
    return card, out


def test_every_variant_agrees_with_keras_and_int8_is_small_and_as_accurate(exported):
    card, out = exported
    files = {f["kind"]: f for f in card["files"]}
    assert set(files) == {"float32", "float16", "dynamic", "int8"}
    keras_accuracy = card["evaluation"]["keras_accuracy"]
    assert keras_accuracy > 0.85  # a trained model, or the comparisons below say little
    for f in files.values():
        assert f["top1_agreement"] >= 0.99, f
        assert (out / f["file"]).stat().st_size == f["bytes"]
        assert f["latency_ms"] > 0
    assert files["float32"]["max_abs_logit_diff"] < 1e-3
    assert files["int8"]["bytes"] <= 0.30 * files["float32"]["bytes"]
    assert files["int8"]["accuracy"] >= keras_accuracy - 0.01
    assert files["float16"]["bytes"] < 0.6 * files["float32"]["bytes"]


def test_the_training_file_is_builtin_only_and_steps_like_keras(exported):
    card, out = exported
    training = card["training"]
    assert training["custom_ops"] == [] and training["batch_size"] == 10
    assert training["one_sgd_step_max_abs_diff_vs_keras"] < 1e-5
    assert (out / training["file"]).stat().st_size == training["bytes"]
