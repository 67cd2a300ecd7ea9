"""Child processes that cannot outlive their parent.

A device, a coordinator or TFF's worker left running after its parent died keeps
ports, memory and inherited pipes (which hang test runners and CI). Passing
``die_with_parent(sig)`` as ``preexec_fn`` asks the kernel (PR_SET_PDEATHSIG) to send
``sig`` to the child when its parent dies, even by SIGKILL.
"""
from __future__ import annotations

import ctypes
import signal
from typing import Callable

_PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int = signal.SIGTERM) -> Callable[[], None]:
    def _preexec() -> None:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, int(sig))

    return _preexec


def raise_on_sigterm() -> None:
    """Turn SIGTERM into KeyboardInterrupt so ``finally`` blocks stop children."""

    def _handler(_signum, _frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _handler)
