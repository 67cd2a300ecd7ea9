"""Shared fixtures: a TFF runtime per session, a coordinator app on a temp instance."""
from __future__ import annotations

import os

import psutil
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def descendants() -> list[psutil.Process]:
    return psutil.Process().children(recursive=True)


@pytest.fixture(scope="session")
def tff_runtime(tmp_path_factory):
    """TFF's worker_binary for the whole session; the session fails if it outlives stop()."""
    from coordinator.tff_runtime import TffRuntime

    runtime = TffRuntime(log_path=tmp_path_factory.mktemp("tff") / "worker_binary.log")
    runtime.start()
    pid = runtime.pid
    yield runtime
    runtime.stop()
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


@pytest.fixture(autouse=True)
def _tff_context_in_this_thread(request):
    """TFF's context stack is thread-local; reinstall it for tests that use it."""
    if "tff_runtime" in request.fixturenames:
        request.getfixturevalue("tff_runtime").install()
    yield
