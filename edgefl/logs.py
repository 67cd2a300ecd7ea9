"""What a user reads: edgefl's own log lines, and other libraries' only when asked.

TensorFlow, TFF, absl, LiteRT and waitress log a lot that looks like trouble and is
not (Grappler's fallbacks, retracing notices, the XNNPACK delegate line, converter
warnings). At the default level (``info``) only edgefl's loggers speak, and other
libraries' records pass only at ERROR; ``debug`` lets everything through, including
TensorFlow's native logs. The level is inherited by child processes through
``EDGEFL_LOG_LEVEL``.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

LEVELS = ("debug", "info", "warning", "error")
ENV = "EDGEFL_LOG_LEVEL"
FORMAT = "%(asctime)s %(name)s[%(process)d] %(levelname)s %(message)s"


def level() -> str:
    chosen = os.environ.get(ENV, "info")
    return chosen if chosen in LEVELS else "info"


def quiet_native_logs() -> None:
    """Before TensorFlow is imported: its C++ logs only when debugging."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "0" if level() == "debug" else "3")
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")


class _OwnLinesFirst(logging.Filter):
    """edgefl's records at the chosen level; other libraries' only from ERROR up."""

    def __init__(self, threshold: int):
        super().__init__()
        self.threshold = threshold

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "edgefl" or record.name.startswith("edgefl."):
            return record.levelno >= self.threshold
        return record.levelno >= max(self.threshold, logging.ERROR)


def configure(chosen: str | None = None, *, stream=None) -> None:
    """Log to ``stream`` (stderr) at ``chosen`` (or the inherited level), for this
    process and the processes it starts."""
    chosen = chosen or level()
    os.environ[ENV] = chosen
    quiet_native_logs()
    threshold = getattr(logging, chosen.upper())
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(logging.Formatter(FORMAT))
    if chosen != "debug":
        handler.addFilter(_OwnLinesFirst(threshold))
    logging.basicConfig(level=logging.DEBUG if chosen == "debug" else threshold, handlers=[handler], force=True)
    for noisy in ("tensorflow", "absl", "jax", "h5py", "matplotlib", "PIL", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.DEBUG if chosen == "debug" else logging.ERROR)


@contextmanager
def native_stderr_silenced() -> Iterator[None]:
    """Silence what native code writes to stderr meanwhile (LiteRT announces its
    XNNPACK delegate there), unless debugging."""
    if level() == "debug":
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)
