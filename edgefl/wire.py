"""Wire format for weights and deltas: safetensors, checked before anything is used.

The header (names, dtypes, shapes, offsets) is parsed and compared with the model's
spec before a byte of tensor data is read, so a malformed or hostile upload costs a
JSON parse, not an allocation. Values are then checked finite. String metadata travels
in the safetensors ``__metadata__`` block (e.g. an update's example count), so an
uploaded blob is self-describing once stored. No pickle anywhere.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from edgefl import jsonsafe

_MAX_HEADER_BYTES = 1 << 20
_DTYPES = {
    "F32": np.dtype(np.float32),
    "I32": np.dtype(np.int32),
    "I64": np.dtype(np.int64),
    "U8": np.dtype(np.uint8),
}
_CODES = {dtype: code for code, dtype in _DTYPES.items()}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str = "F32"

    @property
    def size(self) -> int:
        """Its number of entries."""
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def nbytes(self) -> int:
        return self.size * _DTYPES[self.dtype].itemsize


class WireError(ValueError):
    """A payload that does not fit the spec; ``code`` is the API's error code."""

    def __init__(self, code: str, detail: str):
        super().__init__(detail)
        self.code = code
        self.detail = detail


def _wire_dtype(array: np.ndarray) -> np.dtype:
    """Integers travel as they are (optimizer and DP state have counters); any other
    value is a float32 weight."""
    dtype = np.asarray(array).dtype
    return dtype if dtype in _CODES else _DTYPES["F32"]


def spec_of(names: Sequence[str], arrays: Sequence[np.ndarray]) -> tuple[TensorSpec, ...]:
    return tuple(TensorSpec(n, tuple(int(d) for d in np.shape(a)), _CODES[_wire_dtype(a)]) for n, a in zip(names, arrays))


def encode(names: Sequence[str], arrays: Sequence[np.ndarray], metadata: Mapping[str, str] | None = None) -> bytes:
    from safetensors.numpy import save

    tensors = {n: np.require(a, dtype=_wire_dtype(a), requirements="C") for n, a in zip(names, arrays)}
    payload = save(tensors, metadata=dict(metadata) if metadata else None)
    # safetensors writes __metadata__ in hash-map order, which differs from process to
    # process; blobs are named by their sha256, so the same contents must be the same bytes.
    header, _, start = read_header(payload)
    if metadata:
        header["__metadata__"] = dict(metadata)
    canonical = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    canonical += b" " * (-len(canonical) % 8)
    return struct.pack("<Q", len(canonical)) + canonical + payload[start:]


def read_header(data: bytes) -> tuple[dict, dict[str, str], int]:
    """The tensor entries, metadata and data offset of a safetensors payload."""
    if len(data) < 8:
        raise WireError("malformed", "Body is not a safetensors payload: shorter than its 8-byte header length.")
    (header_len,) = struct.unpack("<Q", data[:8])
    if header_len > _MAX_HEADER_BYTES or 8 + header_len > len(data):
        raise WireError("malformed", "Body is not a safetensors payload: its header length is out of range.")
    try:
        header = jsonsafe.loads(data[8 : 8 + header_len])
    except jsonsafe.JsonError as error:
        raise WireError("malformed", f"Body is not a safetensors payload: its header is not JSON ({error}).") from None
    if not isinstance(header, dict):
        raise WireError("malformed", "Body is not a safetensors payload: its header is not a JSON object.")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise WireError("malformed", "The safetensors __metadata__ must map strings to strings.")
    return header, metadata, 8 + header_len


def spec_of_payload(data: bytes) -> tuple[TensorSpec, ...]:
    """The tensors a well-formed payload (a checkpoint, say) holds, as a spec."""
    header, _, _ = read_header(data)
    return tuple(TensorSpec(name, tuple(entry["shape"]), entry["dtype"]) for name, entry in header.items())


def decode(data: bytes, spec: Sequence[TensorSpec], *, max_abs: float | None = None) -> tuple[list[np.ndarray], dict[str, str]]:
    """Arrays in ``spec`` order and the metadata, or a ``WireError`` saying what is wrong.
    With ``max_abs``, float values beyond it in magnitude are refused too."""
    header, metadata, start = read_header(data)
    expected = {s.name: s for s in spec}
    missing = sorted(set(expected) - set(header))
    unknown = sorted(set(header) - set(expected))
    if missing or unknown:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing[:5])}")
        if unknown:
            parts.append(f"unexpected {', '.join(unknown[:5])}")
        raise WireError("wrong_tensors", f"Tensor names differ from the model's: {'; '.join(parts)}.")
    body_len = len(data) - start
    spans = []
    for name, entry in header.items():
        want = expected[name]
        if not isinstance(entry, dict):
            raise WireError("malformed", f"Header entry for {name} is not an object.")
        if entry.get("dtype") != want.dtype:
            raise WireError("wrong_dtype", f"{name} has dtype {entry.get('dtype')!r}; the model needs {want.dtype}.")
        shape = entry.get("shape")
        if not isinstance(shape, list) or tuple(shape) != want.shape:
            raise WireError("wrong_shape", f"{name} has shape {shape}; the model needs {list(want.shape)}.")
        offsets = entry.get("data_offsets")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) for o in offsets)
            or offsets[1] - offsets[0] != want.nbytes
            or offsets[0] < 0
            or offsets[1] > body_len
        ):
            raise WireError("malformed", f"{name} has data offsets that do not fit its shape or the body.")
        spans.append(tuple(offsets))
    spans.sort()
    ends = [0] + [end for _, end in spans]
    if [begin for begin, _ in spans] != ends[:-1] or ends[-1] != body_len:
        raise WireError("malformed", "Tensor data does not exactly fill the body (gaps, overlaps or trailing bytes).")

    arrays = []
    for s in spec:
        begin, end = header[s.name]["data_offsets"]
        dtype = _DTYPES[s.dtype]
        array = np.frombuffer(data, dtype=dtype, count=(end - begin) // dtype.itemsize, offset=start + begin)
        if not np.isfinite(array).all():
            raise WireError("non_finite", f"{s.name} contains NaN or Inf values.")
        if max_abs is not None and dtype.kind == "f" and array.size and np.abs(array).max() > max_abs:
            raise WireError("out_of_range", f"{s.name} has values beyond +-{max_abs:g}.")
        arrays.append(array.reshape(s.shape))
    return arrays, metadata
