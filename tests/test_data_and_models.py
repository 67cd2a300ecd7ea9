"""Datasets, partitioners and the model zoo."""

from __future__ import annotations

import numpy as np
import pytest

from edgefl.datasets import load_dataset
from edgefl.partition import PartitionSpec, partition


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def test_digits_are_28x28_in_unit_range_with_a_fixed_split(digits):
    assert digits.train.x.shape == (1437, 28, 28, 1) and digits.test.x.shape == (360, 28, 28, 1)
    assert digits.train.x.dtype == np.float32
    assert 0.0 <= digits.train.x.min() and digits.train.x.max() <= 1.0
    assert set(np.unique(digits.test.y)) == set(range(10))
    # Fixed: a second load (a fresh process would do the same) gives the same split.
    load_dataset.cache_clear()
    again = load_dataset("digits")
    np.testing.assert_array_equal(again.test.y, digits.test.y)
    np.testing.assert_array_equal(again.train.x[:5], digits.train.x[:5])


@pytest.mark.parametrize("spec", ["iid", "dirichlet:0.5", "dirichlet:100", "classes:2", "classes:1"])
def test_every_example_is_used_exactly_once(digits, spec):
    shards = partition(digits.train.y, spec, 10, seed=3)
    assert len(shards) == 10
    together = np.concatenate(shards)
    assert len(together) == len(digits.train.y)
    assert len(np.unique(together)) == len(together)
    assert all(len(s) > 0 for s in shards)


def test_partitions_are_deterministic_per_seed(digits):
    a = partition(digits.train.y, "dirichlet:0.5", 10, seed=7)
    b = partition(digits.train.y, "dirichlet:0.5", 10, seed=7)
    c = partition(digits.train.y, "dirichlet:0.5", 10, seed=8)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def _dominant_share(labels, shards):
    """Mean over devices of the fraction of a device's examples in its commonest class."""
    return float(np.mean([np.bincount(labels[s], minlength=10).max() / len(s) for s in shards]))


def test_dirichlet_skew_follows_alpha(digits):
    y = digits.train.y
    iid_share = _dominant_share(y, partition(y, "iid", 10, seed=0))
    skewed = _dominant_share(y, partition(y, "dirichlet:0.1", 10, seed=0))
    mild = _dominant_share(y, partition(y, "dirichlet:1000", 10, seed=0))
    assert skewed > 0.5 > 0.2 > iid_share
    assert abs(mild - iid_share) < 0.05


def test_classes_gives_each_device_exactly_k_classes(digits):
    shards = partition(digits.train.y, "classes:2", 10, seed=0)
    assert [len(np.unique(digits.train.y[s])) for s in shards] == [2] * 10


@pytest.mark.parametrize("bad", ["", "dirichlet", "dirichlet:0", "dirichlet:x", "classes:0", "iid:3", "shards:2"])
def test_bad_partition_specs_are_refused(bad):
    with pytest.raises(ValueError, match="bad partition"):
        PartitionSpec.parse(bad)


def test_classes_needs_every_class_held(digits):
    with pytest.raises(ValueError):
        partition(digits.train.y, "classes:2", 4, seed=0)


def test_fedavg_cnn_has_the_papers_parameter_count():
    from edgefl.models import build_model, model_spec

    model = build_model("cnn", "digits")
    assert model.count_params() == 1_663_370
    assert model.input_shape == (None, 28, 28, 1) and model.output_shape == (None, 10)
    spec = model_spec("cnn", "digits")
    assert [s.name for s in spec] == [
        "conv1/kernel",
        "conv1/bias",
        "conv2/kernel",
        "conv2/bias",
        "dense1/kernel",
        "dense1/bias",
        "logits/kernel",
        "logits/bias",
    ]
    assert sum(int(np.prod(s.shape)) for s in spec) == 1_663_370
    assert build_model("cnn_small", "digits").count_params() < 100_000


def test_seeded_models_start_from_the_same_weights():
    from edgefl.models import build_model

    a, b = build_model("cnn_small", "digits", seed=4).get_weights(), build_model("cnn_small", "digits", seed=4).get_weights()
    assert all(np.array_equal(x, y) for x, y in zip(a, b))


def test_client_update_learns_and_returns_a_delta(digits):
    from edgefl.models import build_model
    from edgefl.training import KerasLearner

    learner = KerasLearner("cnn_small", "digits")
    weights = build_model("cnn_small", "digits", seed=0).get_weights()
    before = learner.evaluate(weights, digits.test.x, digits.test.y)
    result = learner.client_update(weights, digits.train.x, digits.train.y, epochs=2, batch_size=32, learning_rate=0.1, seed=0)
    assert result.num_examples == len(digits.train.y)
    after = learner.evaluate([w + d for w, d in zip(weights, result.delta)], digits.test.x, digits.test.y)
    assert after["accuracy"] > before["accuracy"] + 0.3
    assert after["loss"] < before["loss"]
    # The caller's weights are inputs, not state: they are untouched.
    assert all(np.array_equal(w, v) for w, v in zip(weights, build_model("cnn_small", "digits", seed=0).get_weights()))
