"""Shared fixtures: a TFF runtime per session, a coordinator app on a temp instance."""

from __future__ import annotations

import os
import threading
from http.server import ThreadingHTTPServer

import psutil
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


@pytest.fixture(scope="session")
def tff_runtime(tmp_path_factory):
    """TFF's worker_binary for the whole session; the session fails if it outlives stop()."""
    from edgefl.app.tff_runtime import TffRuntime

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


@pytest.fixture(scope="session")
def small_parts(tff_runtime):
    """A Keras learner and TFF server for cnn_small, traced once per session. With the
    session's runtime installed first: were TFF's own default context used, it would
    start a worker_binary of its own, and replacing that context later waits for that
    worker to exit on SIGINT, which it may never do (a whole test run hung there)."""
    from coordinator.aggregation import FedAvgServer
    from edgefl.models import model_spec
    from edgefl.training import KerasLearner

    return KerasLearner("cnn_small", "digits"), FedAvgServer(model_spec("cnn_small", "digits"))


class Clock:
    """A clock the test moves; it starts at the real time, which the API uses."""

    def __init__(self):
        import time

        self.now = time.time()

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="session")
def postgres():
    """One PostgreSQL server for the session; every test that uses it gets a new database."""
    from tests.postgres_server import PostgresServer

    server = PostgresServer()
    server.start()
    yield server
    server.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request):
    """The store's database: each coordinator test runs on SQLite (the default) and on a
    real PostgreSQL server."""
    if request.param == "sqlite":
        return None
    return request.getfixturevalue("postgres").new_database()


@pytest.fixture
def coordinator(tmp_path, small_parts, db_url):
    """A coordinator app on a fresh instance with a started run, and its round driver.

    The driver runs only when a test calls ``driver.step()``, on a clock the test moves.
    """
    from edgefl.config import RunConfig
    from tests.api_helpers import build_coordinator

    config = RunConfig(model="cnn_small", rounds=2, target_reports=2, min_reports=1, over_selection=1.5, round_timeout_s=60)
    return build_coordinator(tmp_path / "instance", small_parts, config, db_url=db_url, clock=Clock())


@pytest.fixture
def app(coordinator):
    return coordinator[0]


@pytest.fixture
def driver(coordinator):
    return coordinator[1]


@pytest.fixture
def client(app):
    return app.test_client()


@pytest.fixture
def store(app):
    return app.extensions["edgefl.store"]


@pytest.fixture
def open_round(client, driver):
    """Round 1 open, and one device holding a task in it: (its headers, the task)."""
    from tests.api_helpers import register, take_task

    assert driver.step()  # opens round 1
    headers = register(client)
    return headers, take_task(client, headers)


@pytest.fixture
def flaky_server():
    from tests.api_helpers import FlakyCoordinator  # here: importing it imports TensorFlow, after the settings above

    server = ThreadingHTTPServer(("127.0.0.1", 0), FlakyCoordinator)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    FlakyCoordinator.failures, FlakyCoordinator.calls = 3, 0
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join()
