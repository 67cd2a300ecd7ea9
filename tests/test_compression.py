"""Quantized uploads (edgefl.compression): size, error, bias, TFF's decoder, bad bodies."""

from __future__ import annotations

import numpy as np
import pytest

from edgefl import compression, wire
from edgefl.codecs import Codec
from edgefl.config import RunConfig
from edgefl.models import model_spec
from edgefl.wire import TensorSpec, WireError

SPEC = model_spec("cnn_small", "digits")
NAMES = [s.name for s in SPEC]


def _delta(seed=0, scale=0.01):
    rng = np.random.default_rng(seed)
    return [rng.normal(scale=scale, size=s.shape).astype(np.float32) for s in SPEC]


@pytest.mark.parametrize("bits", [1, 2, 4, 8, 16])
def test_each_value_decodes_within_one_step_at_bits_per_value(bits):
    delta = _delta()
    body = Codec(bits).encode(NAMES, delta, {"num_examples": "3"}, np.random.default_rng(1))
    decoded, metadata = Codec(bits).decode(body, SPEC)

    assert metadata == {"num_examples": "3", "quantization_bits": str(bits)}
    values = sum(int(np.prod(s.shape)) for s in SPEC)
    tensor_bytes = sum(-(-int(np.prod(s.shape)) * bits // 8) + 8 for s in SPEC)  # codes, and two float32 bounds
    assert Codec(bits).payload_bytes(SPEC) == tensor_bytes
    assert tensor_bytes < values * bits / 8 + 9 * len(SPEC)
    assert len(body) - tensor_bytes < 2048  # the header
    for original, got in zip(delta, decoded):
        assert got.dtype == np.float32 and got.shape == original.shape
        step = (original.max() - original.min()) / ((1 << bits) - 1)
        assert np.abs(got - original).max() <= step * (1 + 1e-3)
        assert got.min() >= original.min() and got.max() <= original.max() * (1 + 1e-6)


def test_stochastic_rounding_is_unbiased():
    """The mean of many 2-bit encodings of one tensor converges on the tensor; a step is
    a third of its range, so round-to-nearest would stay off by up to half a step."""
    x = _delta()[0]  # conv kernel, 144 values
    spec = SPEC[0]
    rng = np.random.default_rng(2)
    draws = 4000
    mean = np.mean([compression.dequantize(*compression.quantize(x, 2, rng), spec, 2) for _ in range(draws)], axis=0)
    step = (x.max() - x.min()) / 3
    assert np.abs(mean - x).max() < 5 * (step / 2) / np.sqrt(draws)  # 5 sigma of the worst case
    nearest = x.min() + np.round((x - x.min()) / step) * step
    assert np.abs(nearest - x).max() > 10 * np.abs(mean - x).max()


@pytest.mark.parametrize("bits", [1, 2, 4, 16])
def test_codes_pack_into_one_most_significant_bit_first_stream(bits):
    codes = np.random.default_rng(bits).integers(0, 1 << bits, size=1001).astype(np.uint16 if bits > 8 else np.uint8)
    packed = compression._pack(codes, bits)
    as_bits = np.unpackbits(codes.astype(">u2").view(np.uint8).reshape(-1, 2), axis=1)[
        :, 16 - bits :
    ].ravel()  # each code's bits, in order
    np.testing.assert_array_equal(packed, np.packbits(as_bits))
    np.testing.assert_array_equal(compression._unpack(packed, codes.size, bits), codes)


def test_a_constant_tensor_decodes_exactly():
    delta = [np.full(s.shape, 0.25, np.float32) for s in SPEC]
    body = Codec(8).encode(NAMES, delta, {}, np.random.default_rng(0))
    for got in Codec(8).decode(body, SPEC)[0]:
        assert (got == 0.25).all()


@pytest.mark.parametrize("bits", [2, 8])
def test_decoding_is_tensor_encodings_uniform_quantization(bits):
    """The coordinator's decoder gives the very numbers of tensor_encoding's
    UniformQuantizationEncodingStage (what TFF's EncodedFactory decodes with)."""
    from tensorflow_model_optimization.python.core.internal.tensor_encoding.stages.stages_impl import (
        UniformQuantizationEncodingStage,
    )

    stage = UniformQuantizationEncodingStage(bits=bits)
    x = _delta(seed=4, scale=0.3)[2]
    spec = SPEC[2]
    packed, bounds = compression.quantize(x, bits, np.random.default_rng(5))
    ours = compression.dequantize(packed, bounds, spec, bits)
    codes = np.unpackbits(packed, count=x.size * bits).reshape(-1, bits) @ (1 << np.arange(bits - 1, -1, -1))
    encoded = {stage.ENCODED_VALUES_KEY: codes.astype(np.float32), stage.MIN_MAX_VALUES_KEY: bounds}
    theirs = np.asarray(stage.decode(encoded, {stage.MAX_INT_VALUE_PARAMS_KEY: float((1 << bits) - 1)}))
    np.testing.assert_array_equal(ours.ravel(), theirs)


def _quantized(bits=8, **replace):
    """A well-formed 8-bit upload's tensors, with some replaced."""
    names, arrays = [], []
    for s, d in zip(SPEC, _delta()):
        packed, bounds = compression.quantize(d, bits, np.random.default_rng(0))
        names += [s.name, s.name + compression.BOUNDS_SUFFIX]
        arrays += [packed, replace.get(s.name + compression.BOUNDS_SUFFIX, bounds)]
    return names, arrays


@pytest.mark.parametrize(
    "make_body, code, words",
    [
        (lambda: wire.encode(NAMES, _delta(), {}), "wrong_tensors", "8-bit quantized"),  # float32
        (lambda: wire.encode(*_quantized(), {"quantization_bits": "4"}), "wrong_quantization", "must be 8"),
        (lambda: wire.encode(*_quantized(), {}), "wrong_quantization", "must be 8"),
        (lambda: wire.encode(*_quantized(4), {"quantization_bits": "4"}), "wrong_shape", "8-bit quantized"),
        (
            lambda: wire.encode(
                *_quantized(**{SPEC[0].name + ":min_max": np.array([1, -1], np.float32)}), {"quantization_bits": "8"}
            ),
            "bad_bounds",
            "min <= max",
        ),
        (
            lambda: wire.encode(
                *_quantized(**{SPEC[1].name + ":min_max": np.array([-3e38, 3e38], np.float32)}), {"quantization_bits": "8"}
            ),
            "out_of_range",
            "beyond",
        ),
        (
            lambda: wire.encode(
                *_quantized(**{SPEC[3].name + ":min_max": np.array([0, np.nan], np.float32)}), {"quantization_bits": "8"}
            ),
            "non_finite",
            "NaN",
        ),
        (lambda: Codec(8).encode(NAMES, _delta(), {}, np.random.default_rng(0))[:-1], "malformed", "body"),
    ],
    ids=["float32", "other-bits", "no-bits", "4-bit-codes", "min-above-max", "overflowing-span", "nan-bound", "truncated"],
)
def test_bad_quantized_uploads_are_refused_with_a_reason(make_body, code, words):
    with pytest.raises(WireError) as raised:
        Codec(8).decode(make_body(), SPEC)
    assert raised.value.code == code and words in raised.value.detail


def test_float32_runs_are_unchanged():
    body = Codec(None).encode(NAMES, _delta(), {"num_examples": "1"}, np.random.default_rng(0))
    assert body == wire.encode(NAMES, _delta(), {"num_examples": "1"})
    assert Codec(None).payload_bytes(SPEC) == sum(s.nbytes for s in SPEC)


def test_the_configuration_asks_devices_for_quantized_updates_only_when_compressed():
    assert RunConfig().upload_codec.name == "float32"
    assert RunConfig(aggregator="compressed").upload_codec.name == "quantized:8"
    assert RunConfig(aggregator="compressed", compression_bits=4).upload_codec.bits == 4
    assert RunConfig(aggregator="mean", compression_bits=4).upload_codec.bits is None
    for bits in (0, 3, 12, 17):
        with pytest.raises(ValueError, match="compression_bits must be one of 1, 2, 4, 8, 16"):
            RunConfig(aggregator="compressed", compression_bits=bits)


def test_the_spec_of_a_quantized_update_names_codes_and_bounds():
    assert compression.quantized_spec([TensorSpec("k", (3, 5))], 3) == (
        TensorSpec("k", (6,), "U8"),
        TensorSpec("k:min_max", (2,), "F32"),  # 15 values x 3 bits in 6 bytes
    )
