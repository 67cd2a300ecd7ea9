"""SecAgg+'s phases (edgefl.secagg) on their own, devices and coordinator in one process:
the sum is exact, dropouts after any phase are survived down to the threshold and not
below, nothing revealed says more than the protocol allows, and forged, misrouted or
replayed messages are refused."""

from __future__ import annotations

import secrets

import numpy as np
import pytest

from edgefl.secagg import crypto, graph, shamir
from edgefl.secagg import protocol as P
from edgefl.secagg.crypto import SecAggError

BITS = 40  # room for the sum of 2^8 inputs below 2^32


def make_round(devices=16, size=2_000, degree=None, threshold=None, round_id=1, seed=3):
    degree = graph.default_degree(devices) if degree is None else degree
    threshold = graph.default_threshold(degree) if threshold is None else threshold
    params = P.RoundParams(round_id, devices, size, BITS, degree, threshold, graph_seed=seed)
    secrets = {i: P.advertise(i) for i in range(devices)}
    keys = {i: s.public for i, s in secrets.items()}
    inputs = {i: np.random.default_rng(i).integers(0, 2**32, size, dtype=np.uint64) for i in range(devices)}
    return params, secrets, keys, inputs


def run(params, secrets, keys, inputs, *, advertised=None, shared=None, masked=None, unmasking=None):
    """The four phases with the given survivors of each; (sum, what was summed)."""
    advertised = set(range(params.devices)) if advertised is None else advertised
    keys = {i: k for i, k in keys.items() if i in advertised}
    sealed = {i: P.share_keys(params, secrets[i], keys) for i in sorted(advertised if shared is None else shared)}
    shared = set(sealed)
    inbox = {v: {u: c[v] for u, c in sealed.items() if v in c} for v in shared}
    masked = shared if masked is None else masked
    uploads = {i: P.masked_input(params, secrets[i], keys, shared, inputs[i]) for i in sorted(masked)}
    unmasking = set(uploads) if unmasking is None else unmasking
    revealed = {i: P.unmask(params, secrets[i], keys, inbox[i], shared, set(uploads)) for i in sorted(unmasking)}
    return P.aggregate(params, keys, shared, uploads, revealed), set(uploads)


def plain_sum(inputs, devices) -> np.ndarray:
    total = np.zeros_like(next(iter(inputs.values())))
    for i in devices:
        total += inputs[i]
    return total & np.uint64((1 << BITS) - 1)


def test_the_sum_is_exactly_the_plain_sum():
    params, secrets, keys, inputs = make_round()
    total, summed = run(params, secrets, keys, inputs)
    assert summed == set(range(params.devices))
    np.testing.assert_array_equal(total, plain_sum(inputs, summed))


@pytest.mark.parametrize("phase", ["advertise", "share", "masked input", "unmask"])
def test_dropouts_after_each_phase_leave_the_survivors_sum(phase):
    params, secrets, keys, inputs = make_round(devices=24, degree=10, threshold=6)
    dropped = {2, 9, 17}
    everyone = set(range(params.devices))
    survivors = everyone - dropped
    kwargs = {
        "advertise": {"advertised": survivors},
        "share": {"shared": survivors},
        "masked input": {"masked": survivors},
        "unmask": {"unmasking": survivors},
    }[phase]
    total, summed = run(params, secrets, keys, inputs, **kwargs)
    assert summed == (everyone if phase == "unmask" else survivors)  # after unmask: their inputs arrived
    np.testing.assert_array_equal(total, plain_sum(inputs, summed))


def _neighbourhood_cut(params, owner, keep):
    """All devices but ``owner``'s neighbours beyond the first ``keep``."""
    return set(range(params.devices)) - set(params.neighbours[owner][keep:])


def test_exactly_the_threshold_of_a_neighbourhood_suffices_and_one_fewer_reveals_nothing():
    params, secrets, keys, inputs = make_round(devices=20, degree=8, threshold=5)
    # Device 0 keeps exactly 5 of its 8 neighbours through unmasking: its seed is recovered.
    unmasking = _neighbourhood_cut(params, 0, 5)
    total, summed = run(params, secrets, keys, inputs, unmasking=unmasking)
    np.testing.assert_array_equal(total, plain_sum(inputs, summed))
    # With 4, the coordinator cannot recover device 0's self mask: no sum at all.
    with pytest.raises(SecAggError, match="cannot recover"):
        run(params, secrets, keys, inputs, unmasking=_neighbourhood_cut(params, 0, 4))


def test_a_device_refuses_to_unmask_when_too_few_of_its_neighbours_inputs_arrived():
    """A coordinator claiming dropouts (to learn a live device's mask key) is refused."""
    params, secrets, keys, inputs = make_round(devices=20, degree=8, threshold=5)
    shared = set(range(params.devices))
    claimed = shared - set(params.neighbours[0][:4])  # only 4 of device 0's neighbours "arrived"
    sealed = {i: P.share_keys(params, secrets[i], keys) for i in shared}
    inbox = {u: c[0] for u, c in sealed.items() if 0 in c}
    with pytest.raises(SecAggError, match="fewer than 5"):
        P.unmask(params, secrets[0], keys, inbox, shared, claimed)
    with pytest.raises(SecAggError, match="must have shared keys"):
        P.unmask(params, secrets[0], keys, inbox, shared - {1}, shared)


def test_a_device_reveals_one_kind_of_share_per_neighbour_and_the_coordinator_takes_no_other():
    params, secrets, keys, inputs = make_round(devices=12, degree=6, threshold=4)
    shared = set(range(params.devices))
    masked = shared - {5}
    sealed = {i: P.share_keys(params, secrets[i], keys) for i in shared}
    revealed = {}
    for i in sorted(masked):
        inbox = {u: c[i] for u, c in sealed.items() if i in c}
        revealed[i] = P.unmask(params, secrets[i], keys, inbox, shared, masked)
        assert set(revealed[i]) == set(params.neighbours[i])  # one entry (one kind) per neighbour
        assert all(kind == (P.KEY if owner == 5 else P.SEED) for owner, (kind, _) in revealed[i].items())
    uploads = {i: P.masked_input(params, secrets[i], keys, shared, inputs[i]) for i in masked}
    holder = next(h for h in masked if 5 in revealed[h])
    forged = {**revealed, holder: {**revealed[holder], 5: (P.SEED, revealed[holder][5][1])}}
    with pytest.raises(SecAggError, match="only key was asked"):
        P.aggregate(params, keys, shared, uploads, forged)


def test_tampered_misrouted_and_replayed_shares_fail_authentication():
    params, secrets, keys, _ = make_round(devices=8, degree=4, threshold=3)
    sealed = {i: P.share_keys(params, secrets[i], keys) for i in range(8)}
    receiver = params.neighbours[0][0]
    good = sealed[0][receiver]
    shared = set(range(8))

    def unmask_with(ciphertext, me=receiver, sender=0, p=params):
        inbox = {u: c[me] for u, c in sealed.items() if me in c}
        return P.unmask(p, secrets[me], keys, {**inbox, sender: ciphertext}, shared, shared)

    assert unmask_with(good)[0][0] == P.SEED
    flipped = bytearray(good)
    flipped[-1] ^= 1
    with pytest.raises(SecAggError, match="authentication"):
        unmask_with(bytes(flipped))
    other = next(v for v in params.neighbours[0] if v != receiver and v in params.neighbours[receiver])
    with pytest.raises(SecAggError, match="authentication"):  # another neighbour's ciphertext, sent as from device 0
        unmask_with(sealed[other][receiver] if receiver in sealed[other] else sealed[0][other])
    replay = P.RoundParams(2, 8, params.size, BITS, 4, 3, graph_seed=params.graph_seed)
    with pytest.raises(SecAggError, match="authentication"):  # round 1's ciphertext in round 2
        unmask_with(good, p=replay)
    with pytest.raises(SecAggError, match="too short"):
        unmask_with(b"x")


def test_masked_inputs_look_uniform_and_do_not_correlate_with_the_input():
    params, secrets, keys, inputs = make_round(devices=10, size=50_000)
    shared = set(range(10))
    y = P.masked_input(params, secrets[0], keys, shared, inputs[0])
    # Each of the 40 bits is set about half the time (chi-square over the top byte too).
    bits = np.unpackbits(y.astype(">u8").view(np.uint8)).reshape(-1, 64)[:, 64 - BITS :]
    assert np.all(np.abs(bits.mean(axis=0) - 0.5) < 0.01)
    top = (y >> np.uint64(BITS - 8)).astype(np.int64)
    counts = np.bincount(top, minlength=256)
    expected = len(y) / 256
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 350  # 255 degrees of freedom: p < 1e-4 beyond this
    correlation = np.corrcoef(y.astype(np.float64), inputs[0].astype(np.float64))[0, 1]
    assert abs(correlation) < 0.03
    # An all-zero input is as uniform: the masks alone carry it.
    zero = P.masked_input(params, secrets[0], keys, shared, np.zeros(params.size, np.uint64))
    assert (
        np.abs(np.unpackbits(zero.astype(">u8").view(np.uint8)).reshape(-1, 64)[:, 64 - BITS :].mean(axis=0) - 0.5).max() < 0.01
    )


def test_masks_are_a_keyed_stream():
    seed = crypto.new_seed()
    a, b = crypto.mask(seed, 1000, 32), crypto.mask(seed, 1000, 32)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, crypto.mask(crypto.new_seed(), 1000, 32))
    assert int(a.max()) < 2**32 and int(crypto.mask(seed, 1000, 64).max()) >= 2**32
    with pytest.raises(SecAggError):
        crypto.mask(b"short", 10, 32)


def test_shamir_shares_recover_from_any_threshold_and_not_from_fewer():
    secret = crypto.new_seed()
    shares = shamir.split(secret, 3, 6)
    assert all(len(s) == shamir.SHARE_BYTES for s in shares)
    for chosen in ([1, 2, 3], [2, 4, 6], [6, 5, 4, 3]):
        assert shamir.combine({x: shares[x - 1] for x in chosen}, 3) == secret
    with pytest.raises(SecAggError, match="cannot recover"):
        shamir.combine({1: shares[0], 2: shares[1]}, 3)
    forged = secrets.randbelow(shamir.PRIME).to_bytes(shamir.SHARE_BYTES, "big")  # a share made up
    with pytest.raises(SecAggError, match="do not recover"):
        shamir.combine({1: shares[0], 2: shares[1], 3: forged}, 3)
    with pytest.raises(SecAggError, match="not a point"):
        shamir.combine({1: shares[0], 2: shares[1], 3: b"short"}, 3)


@pytest.mark.parametrize("devices", [2, 7, 30, 100, 1000])
def test_the_graph_is_regular_symmetric_and_logarithmic(devices):
    degree = graph.default_degree(devices)
    assert degree == devices - 1 or degree <= 2 * np.ceil(3 * np.log2(devices))
    neighbours = graph.neighbours(devices, degree, seed=1)
    assert all(len(n) == degree and i not in n for i, n in enumerate(neighbours))
    assert all(i in neighbours[v] for i, n in enumerate(neighbours) for v in n)
    if devices == 1000:
        assert degree == 60


@pytest.mark.parametrize("bounds", [(-1.0, 1.0), (-0.01, 0.03), (0.0, 1000.0), (-3.5, 2.25), (0.5, 0.5)])
def test_the_devices_quantization_is_tffs_bit_for_bit(bounds):
    """The same float32 values through TFF's own client shift (TensorFlow, eagerly) and
    through the device's numpy twin: identical int64 codes, clipping and ties included."""
    import tensorflow as tf
    from tensorflow_federated.python.aggregators.primitives import _client_tensor_shift_for_secure_sum

    from edgefl.secagg.quantize import clip_counts, secure_quantize

    lower, upper = (np.float32(b) for b in bounds)
    rng = np.random.default_rng(7)
    span = max(float(upper - lower), 1.0)
    value = np.concatenate(
        [
            rng.uniform(float(lower) - span, float(upper) + span, 20_000),  # a third clipped
            [lower, upper, np.nextafter(upper, np.float32(np.inf)), np.nextafter(lower, np.float32(-np.inf)), 0.0],
            rng.normal(0, 1e-3, 1000),
        ]
    ).astype(np.float32)
    theirs = _client_tensor_shift_for_secure_sum(tf.constant(value), tf.constant(lower), tf.constant(upper)).numpy()
    ours = secure_quantize(value, lower, upper)
    assert ours.dtype == np.int64 and theirs.dtype == np.int64
    np.testing.assert_array_equal(ours, theirs)
    assert clip_counts(value.max(), value.min(), lower, upper) == (1, 1)
    assert clip_counts(upper, lower, lower, upper) == (0, 0)


def test_a_devices_secure_input_does_not_depend_on_the_order_its_runtime_lists_tensors_in():
    """A LiteRT device lists tensors by name, a Keras device in the model's order: both
    hand the secure sums the same vector, in the order checkpoints list them."""
    from edgefl.secagg.quantize import SecureMeanLayout, flatten, secure_mean_inputs
    from edgefl.wire import TensorSpec

    rng = np.random.default_rng(0)
    names, shapes = ["conv/kernel", "conv/bias", "dense/kernel"], [(3, 3), (3,), (4, 2)]
    delta = {n: rng.normal(0, 0.1, s).astype(np.float32) for n, s in zip(names, shapes)}
    model_order = flatten(secure_mean_inputs(names, [delta[n] for n in names], 7.0, 1.0, 100.0))
    by_name = sorted(names)
    assert np.array_equal(model_order, flatten(secure_mean_inputs(by_name, [delta[n] for n in by_name], 7.0, 1.0, 100.0)))
    layout = SecureMeanLayout.of([TensorSpec(n, s) for n, s in zip(names, shapes)])
    assert [n for n, _ in layout.tensors] == by_name and layout.size == model_order.size == 2 + 9 + 3 + 8 + 5
    leaves = layout.leaves_in(layout.split(model_order), names)  # TFF's order: the model's
    assert [leaf.size for leaf in leaves[2:5]] == [9, 3, 8]
