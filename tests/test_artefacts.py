"""The phone artefacts: built by the real ``edgefl export`` in a child process, served
with ETags, replaced (and their old blobs deleted) when the model changes."""

from __future__ import annotations

import hashlib
import threading
import time
from contextlib import closing

import psutil
import pytest

from edgefl.app.launcher import edgefl_command
from tests.api_helpers import assert_error, register, take_task, update_body, upload

pytestmark = pytest.mark.slow

MODELS = ("/v1/models/latest.tflite", "/v1/models/latest-train.tflite", "/v1/models/latest.json")


@pytest.mark.parametrize("db_url", [None])  # SQLite only: nothing here depends on the database, and a build is slow
def test_artefacts_are_built_off_the_request_path_served_and_replaced(client, store, driver, tmp_path):
    from coordinator.artefacts import Publisher, published, wanted

    others = {p.pid for p in psutil.Process().children(recursive=True)}  # what other fixtures started
    for path in MODELS:  # nothing built yet: come back later
        response = client.get(path)
        assert_error(response, 503, "not_built_yet")
        assert response.headers["Retry-After"] == "5"

    publisher = Publisher(store, edgefl_command("export"), tmp_path / "publish.log")
    with closing(store.connect()) as db:
        first = wanted(db)
    assert publisher.build(first)
    served = {}
    for path in MODELS:
        response = client.get(path)
        assert response.status_code == 200 and response.headers["X-Edgefl-Model-Version"] == "0"
        etag = response.headers["ETag"].strip('"')
        assert etag == hashlib.sha256(response.data).hexdigest()
        assert client.get(path, headers={"If-None-Match": f'"{etag}"'}).status_code == 304
        served[path] = etag
    assert client.get(MODELS[2]).json["training"]["batch_size"] == driver.config.batch_size

    # Round 1 commits: the publisher's loop sees the store ahead of what it serves, builds
    # version 1 once, and the old blobs go.
    headers = register(client)
    assert driver.step()
    task = take_task(client, headers)
    assert upload(client, headers, task["round_id"], update_body(seed=1)).status_code == 202
    driver.clock.now += driver.config.round_timeout_s  # the deadline, with min_reports in
    while driver.step():
        pass
    with closing(store.connect()) as db:
        assert wanted(db).version == 1
    stop = threading.Event()
    loop = threading.Thread(target=publisher.run, args=(stop,))
    loop.start()
    try:
        deadline = time.monotonic() + 120
        with closing(store.connect()) as db:
            while published(db) != (1, driver.config.batch_size):
                assert loop.is_alive() and time.monotonic() < deadline, (tmp_path / "publish.log").read_text()[-2000:]
                stop.wait(0.5)
    finally:
        stop.set()
        loop.join(timeout=30)
    for path in MODELS:
        response = client.get(path, headers={"If-None-Match": f'"{served[path]}"'})
        assert response.status_code == 200 and response.headers["X-Edgefl-Model-Version"] == "1"
        assert not store.blobs.exists(served[path])
    survivors = [p for p in psutil.Process().children(recursive=True) if p.pid not in others and p.name() != "postgres"]
    assert not survivors, "an export process outlived its build"
