"""Named points where a process (the coordinator, a device host) can be held still, so
a test can kill it there.

A crash can land between any two instructions, but a test that sends SIGKILL at a
random moment almost never lands inside the few milliseconds that matter (an upload's
blob written but its row not committed; a round marked aggregating but not committed).
With ``EDGEFL_HOLD_AT=name[,name...]`` in the environment, ``hold(name)`` prints
``edgefl: holding at <name>`` and sleeps for good, so the test knows the process is
exactly there when it kills it; ``name@N`` holds only where the caller says ``at=N``
(a round number, say). Unset (always, outside tests) it returns at once.
"""

from __future__ import annotations

import os
import sys
import threading

_HELD = frozenset(filter(None, os.environ.get("EDGEFL_HOLD_AT", "").split(",")))


def hold(name: str, at: object = None) -> None:
    if name in _HELD or f"{name}@{at}" in _HELD:
        where = name if at is None else f"{name}@{at}"
        print(f"edgefl: holding at {where}", file=sys.stderr, flush=True)
        threading.Event().wait()
