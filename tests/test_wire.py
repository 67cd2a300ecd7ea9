"""The wire format: round trips, and every way a payload can fail to fit the model."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from edgefl import wire
from edgefl.wire import TensorSpec, WireError

SPEC = (TensorSpec("conv/kernel", (3, 3, 1, 4)), TensorSpec("conv/bias", (4,)), TensorSpec("scale", ()))


def _arrays(seed=0):
    rng = np.random.default_rng(seed)
    return [rng.normal(size=s.shape).astype(np.float32) for s in SPEC]


def _names():
    return [s.name for s in SPEC]


def _reheader(data: bytes, edit) -> bytes:
    """Rewrite a payload's JSON header with ``edit`` and keep its data."""
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    edit(header)
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data[8 + n :]


def test_round_trip_keeps_values_order_and_metadata():
    arrays = _arrays()
    data = wire.encode(_names(), arrays, {"num_examples": "12"})
    decoded, metadata = wire.decode(data, SPEC)
    assert metadata == {"num_examples": "12"}
    for got, want, spec in zip(decoded, arrays, SPEC):
        assert got.shape == spec.shape and got.dtype == np.float32
        np.testing.assert_array_equal(got, want)


def test_payload_is_plain_safetensors():
    from safetensors.numpy import load

    arrays = _arrays()
    loaded = load(wire.encode(_names(), arrays))
    assert sorted(loaded) == sorted(_names())
    np.testing.assert_array_equal(loaded["conv/bias"], arrays[1])


@pytest.mark.parametrize(
    "payload, code",
    [
        (b"", "malformed"),
        (b"\x01\x02\x03", "malformed"),
        (struct.pack("<Q", 10**9) + b"{}", "malformed"),
        (struct.pack("<Q", 5) + b"nope!", "malformed"),
        (struct.pack("<Q", 2) + b"[]", "malformed"),
    ],
)
def test_garbage_is_malformed(payload, code):
    with pytest.raises(WireError) as info:
        wire.decode(payload, SPEC)
    assert info.value.code == code


def test_missing_and_unexpected_tensors_are_named():
    data = wire.encode(["conv/kernel", "conv/bias", "other"], _arrays())
    with pytest.raises(WireError) as info:
        wire.decode(data, SPEC)
    assert info.value.code == "wrong_tensors"
    assert "missing scale" in info.value.detail and "unexpected other" in info.value.detail


def test_wrong_shape_is_rejected():
    arrays = _arrays()
    arrays[1] = np.zeros(5, np.float32)
    with pytest.raises(WireError) as info:
        wire.decode(wire.encode(_names(), arrays), SPEC)
    assert info.value.code == "wrong_shape" and "conv/bias" in info.value.detail


def test_wrong_dtype_is_rejected():
    from safetensors.numpy import save

    arrays = dict(zip(_names(), _arrays()))
    arrays["conv/bias"] = arrays["conv/bias"].astype(np.float64)
    with pytest.raises(WireError) as info:
        wire.decode(save(arrays), SPEC)
    assert info.value.code == "wrong_dtype"


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_values_are_rejected(bad):
    arrays = _arrays()
    arrays[0][1, 2, 0, 3] = bad
    with pytest.raises(WireError) as info:
        wire.decode(wire.encode(_names(), arrays), SPEC)
    assert info.value.code == "non_finite" and "conv/kernel" in info.value.detail


def test_offsets_must_fit_shapes_and_fill_the_body():
    data = wire.encode(_names(), _arrays())

    def overlap(header):
        begin, end = header["conv/kernel"]["data_offsets"]
        header["conv/kernel"]["data_offsets"] = [begin - 8, end - 8]

    def beyond(header):
        begin, _ = header["scale"]["data_offsets"]
        header["scale"]["data_offsets"] = [begin + 1000, begin + 1004]

    for edit in (overlap, beyond):
        with pytest.raises(WireError) as info:
            wire.decode(_reheader(data, edit), SPEC)
        assert info.value.code == "malformed"
    with pytest.raises(WireError) as info:
        wire.decode(data + b"\x00" * 4, SPEC)
    assert info.value.code == "malformed"


def test_metadata_must_be_strings():
    data = wire.encode(_names(), _arrays(), {"num_examples": "3"})
    with pytest.raises(WireError) as info:
        wire.decode(_reheader(data, lambda h: h.update({"__metadata__": {"num_examples": 3}})), SPEC)
    assert info.value.code == "malformed"


def test_the_same_contents_encode_to_the_same_bytes_in_every_process():
    """Blobs are named by sha256; safetensors alone orders metadata by a per-process hash."""
    import subprocess
    import sys

    program = (
        "import hashlib, numpy as np; from edgefl import wire; "
        "print(hashlib.sha256(wire.encode(['b', 'a'], [np.ones(3, np.float32), np.zeros(2, np.int64)],"
        " {'version': '1', 'model': 'm', 'num_examples': '5', 'metrics': '{}'})).hexdigest())"
    )
    digests = {
        subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, check=True).stdout for _ in range(4)
    }
    assert len(digests) == 1
