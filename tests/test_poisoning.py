"""Poisoned updates, through the real client update and the compiled TFF aggregators:
one device in ten sends its delta scaled by 100, or by -100 (sign-flipped). ``robust``
keeps the final accuracy within a point of clean FedAvg; ``mean`` is wrecked by both.
(Non-finite updates never get this far: the API refuses them, see test_api.)

A flip without scaling keeps the update's norm, which is all TFF's robust aggregator
looks at, so it is no test of this defence: to it, that device is one honest-sized
update pulling the other way."""

from __future__ import annotations

import pytest

from edgefl.datasets import load_dataset
from edgefl.models import build_model, model_spec
from edgefl.partition import partition

pytestmark = pytest.mark.slow

ROUNDS, DEVICES = 20, 10
ATTACKS = {"none": None, "scaled": lambda d: [x * 100 for x in d], "flipped": lambda d: [x * -100 for x in d]}


@pytest.fixture(scope="module")
def final_accuracy(small_parts):
    from coordinator.aggregation import FedAvgServer, ServerSettings

    learner = small_parts[0]
    data = load_dataset("digits")
    shards = partition(data.train.y, "iid", DEVICES, 0)
    results = {}

    def run(aggregator: str, attack: str) -> float:
        if (aggregator, attack) not in results:
            server = FedAvgServer(model_spec("cnn_small", "digits"), ServerSettings(aggregator=aggregator))
            weights, state = build_model("cnn_small", "digits", seed=0).get_weights(), server.initialize()
            for round_number in range(ROUNDS):
                updates = []
                for device, shard in enumerate(shards):
                    result = learner.client_update(
                        weights,
                        data.train.x[shard],
                        data.train.y[shard],
                        epochs=1,
                        batch_size=10,
                        learning_rate=0.1,
                        seed=round_number * DEVICES + device,
                    )
                    poison = ATTACKS[attack] if device == 0 else None  # 10% of the devices
                    updates.append((poison(result.delta) if poison else result.delta, result.num_examples))
                output = server.next(state, weights, updates)
                state, weights = output.state, output.weights
            results[aggregator, attack] = learner.evaluate(weights, data.test.x, data.test.y)["accuracy"]
            print(f"{aggregator:7} {attack:8} final accuracy {results[aggregator, attack]:.4f}")
        return results[aggregator, attack]

    return run


@pytest.mark.parametrize("attack", ["scaled", "flipped"])
def test_robust_stays_within_a_point_of_clean_fedavg(final_accuracy, attack):
    clean = final_accuracy("mean", "none")
    assert clean > 0.8
    assert final_accuracy("robust", attack) >= clean - 0.01


@pytest.mark.parametrize("attack", ["scaled", "flipped"])
def test_mean_is_wrecked_by_the_same_attacks(final_accuracy, attack):
    # One update 100x the size of the others steers the mean wherever it points.
    assert final_accuracy("mean", attack) < final_accuracy("mean", "none") - 0.3
