"""JSON from strangers in, strict JSON out.

Python's ``json`` accepts what no other parser does (``NaN``, ``Infinity``) and fails
on hostile input with errors that are not ``JSONDecodeError``: a ``RecursionError``
for deeply nested arrays, a ``ValueError`` for integers of more than 4,300 digits.
``loads`` turns every one of them into ``JsonError``, so a caller handles bad JSON
with one ``except``. ``dumps`` writes only what a strict parser reads: a non-finite
float (a device's overflowing metric, a diverged model's loss) becomes ``null``.
"""

from __future__ import annotations

import json
import math
from typing import Any

MAX_DEPTH = 32  # deeper than any message of the protocol needs


class JsonError(ValueError):
    """Text that is not the JSON edgefl accepts; the message says why."""


def _no_constants(name: str) -> Any:
    raise JsonError(f"{name} is not a JSON number")


def loads(text: str | bytes, *, max_depth: int = MAX_DEPTH) -> Any:
    """Parse ``text`` as strict JSON (no NaN or Infinity, nesting at most ``max_depth``)."""
    try:
        value = json.loads(text, parse_constant=_no_constants)
    except JsonError:
        raise
    except RecursionError:
        raise JsonError("it is nested too deeply") from None
    except (ValueError, TypeError) as error:  # JSONDecodeError, UnicodeDecodeError, too many digits
        raise JsonError(str(error).split(":")[0] or "it is not JSON") from None
    if depth(value) > max_depth:
        raise JsonError(f"it is nested deeper than {max_depth} levels")
    return value


def depth(value: Any) -> int:
    """How deeply ``value`` nests arrays and objects (a scalar is 0); without recursion,
    so no nesting the parser accepted can exhaust the stack here."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is not None:
            deepest = max(deepest, level)
            stack.extend((child, level + 1) for child in children)
    return deepest


def finite(value: Any) -> Any:
    """``value`` with every NaN or infinite float replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def dumps(value: Any, **kwargs: Any) -> str:
    """Strict JSON: non-finite floats written as null."""
    return json.dumps(finite(value), allow_nan=False, **kwargs)
