"""The devices' calls of the /v1 API through Flask's test client, over a real store:
registering, checking in, downloading checkpoints, uploading updates.

Every bad request must answer 4xx JSON {"error", "detail"} and leave the store (rows
and blobs) exactly as it was.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from edgefl import wire
from tests.api_helpers import (
    SPEC,
    assert_error,
    register,
    rejections,
    take_task,
    update_body,
    upload,
)


def test_register_returns_an_id_and_a_token_stored_hashed(client, store):
    response = client.post("/v1/devices")
    assert response.status_code == 201
    token = response.json["token"]
    rows = store.snapshot()["rows"]["devices"]
    assert len(rows) == 1 and token not in json.dumps(rows)
    assert rows[0][1] == hashlib.sha256(token.encode()).hexdigest()


def test_checkin_before_a_round_opens_says_wait(client):
    response = client.post("/v1/checkin", headers=register(client))
    assert response.json["status"] == "wait" and response.json["retry_after"] > 0
    assert "Retry-After" in response.headers


def test_task_names_the_round_and_the_checkpoint(client, open_round):
    headers, task = open_round
    assert task["round_number"] == 1 and task["model"] == "cnn_small"
    assert (task["epochs"], task["batch_size"], task["learning_rate"]) == (1, 10, 0.05)
    assert take_task(client, headers) == {**task, "seconds_left": pytest.approx(task["seconds_left"], abs=2)}


def test_cohort_is_target_times_over_selection(client, open_round):
    # target 2 x 1.5 = cohort of 3: the fixture's device plus two more; the fourth waits.
    take_task(client, register(client))
    take_task(client, register(client))
    response = client.post("/v1/checkin", headers=register(client))
    assert response.json["status"] == "wait"


def test_a_new_round_selects_waiting_devices_first_in_arrival_order(client, store, driver):
    from contextlib import closing

    from coordinator import rounds

    ids = [client.post("/v1/devices").json["device_id"] for _ in range(4)]
    with closing(store.connect()) as db, store.transaction(db):
        round_id = rounds.begin_round(db, driver.config, 0.0, candidates=[ids[3], "no-such-device", ids[1], ids[2], ids[0]])
        selected = {r[0] for r in db.execute("SELECT device_id FROM assignments WHERE round_id = ?", (round_id,))}
    assert driver.config.cohort_size == 3 and selected == {ids[3], ids[1], ids[2]}  # not ids[0], registered first


def test_checkpoint_is_served_by_hash_with_an_etag(client, store, open_round):
    headers, task = open_round
    sha = task["checkpoint_sha256"]
    response = client.get(f"/v1/checkpoints/{sha}", headers=headers)
    assert response.status_code == 200
    assert hashlib.sha256(response.data).hexdigest() == sha
    assert response.headers["ETag"] == f'"{sha}"'
    weights, metadata = wire.decode(response.data, SPEC)
    assert metadata["version"] == "0"
    again = client.get(f"/v1/checkpoints/{sha}", headers={**headers, "If-None-Match": f'"{sha}"'})
    assert again.status_code == 304 and again.data == b""
    assert client.head(f"/v1/checkpoints/{sha}", headers=headers).status_code == 200
    history = client.get("/v1/rounds").json["rounds"]
    assert history[0]["bytes_down"] == len(response.data)  # the GET's bytes; the 304 and the HEAD sent none


def test_anonymous_checkpoint_downloads_change_nothing(client, store, open_round):
    """Checkpoints are public and cacheable, like files on a CDN: anyone may GET or HEAD
    one, and no such request writes anything (nor counts as a device's download)."""
    headers, task = open_round
    url = f"/v1/checkpoints/{task['checkpoint_sha256']}"
    before = store.snapshot()
    for call, extra in (
        (client.get, {}),
        (client.head, {}),
        (client.get, {"Range": "bytes=0-99"}),
        (client.get, {"Authorization": "Bearer not-a-device"}),
        (client.head, headers),
    ):
        assert call(url, headers=extra).status_code in (200, 206)
    assert store.snapshot() == before


@pytest.mark.parametrize(
    "name, code",
    [("0" * 64, "unknown_checkpoint"), ("not-a-hash", "unknown_checkpoint"), ("../../edgefl.sqlite3", "not_found")],
)
def test_unknown_checkpoints_are_404(client, open_round, name, code):
    assert_error(client.get(f"/v1/checkpoints/{name}"), 404, code)


def test_update_blobs_are_not_served_as_checkpoints(client, store, open_round):
    headers, task = open_round
    body = update_body()
    assert upload(client, headers, task["round_id"], body).status_code == 202
    assert_error(client.get(f"/v1/checkpoints/{hashlib.sha256(body).hexdigest()}"), 404, "unknown_checkpoint")


def test_accepted_update_is_durable_before_202(client, store, open_round):
    headers, task = open_round
    body = update_body(num_examples="37")
    response = upload(client, headers, task["round_id"], body)
    assert response.status_code == 202
    assert response.json == {"round_id": task["round_id"], "accepted": True, "reports": 1}
    rows = store.snapshot()["rows"]["messages"]  # (id, round, phase, device, kind, blob, examples, ...)
    sha = hashlib.sha256(body).hexdigest()
    assert len(rows) == 1 and rows[0][2:3] == ("collect",) and rows[0][4:7] == ("update", sha, 37)
    assert store.blobs.get(sha) == body


def _bad_uploads():
    spec_arrays = lambda: [np.zeros(s.shape, np.float32) for s in SPEC]  # noqa: E731
    nan = spec_arrays()
    nan[2][0, 0, 0, 0] = np.nan
    inf = spec_arrays()
    inf[-1][3] = np.inf
    wrong_shape = spec_arrays()
    wrong_shape[1] = np.zeros(17, np.float32)
    names = [s.name for s in SPEC]
    return {
        "garbage": (b"this is not safetensors", 400, "malformed"),
        "empty": (b"", 400, "malformed"),
        "wrong names": (update_body(names=["x" + n for n in names]), 422, "wrong_tensors"),
        "missing tensor": (wire.encode(names[:-1], spec_arrays()[:-1], {"num_examples": "3"}), 422, "wrong_tensors"),
        "wrong shape": (update_body(arrays=wrong_shape), 422, "wrong_shape"),
        "nan": (update_body(arrays=nan), 422, "non_finite"),
        "inf": (update_body(arrays=inf), 422, "non_finite"),
        "no num_examples": (update_body(num_examples=None), 400, "bad_num_examples"),
        "zero examples": (update_body(num_examples="0"), 400, "bad_num_examples"),
        "negative examples": (update_body(num_examples="-5"), 400, "bad_num_examples"),
        "unicode digits": (update_body(num_examples="\u00b2"), 400, "bad_num_examples"),
        "metric too large for a float": (update_body(metrics='{"n": 1' + "0" * 400 + "}"), 400, "bad_metrics"),
        "metrics not json": (update_body(metrics="{oops"), 400, "bad_metrics"),
        "metrics nan": (update_body(metrics='{"loss": NaN}'), 400, "bad_metrics"),
    }


@pytest.mark.parametrize("case", list(_bad_uploads()))
def test_bad_update_bodies_are_refused_and_change_nothing(client, store, open_round, case):
    headers, task = open_round
    body, status, code = _bad_uploads()[case]
    before = store.snapshot()
    assert_error(upload(client, headers, task["round_id"], body), status, code)
    assert store.snapshot() == before
    assert rejections(store) == [(task["round_id"], code, 0)]


def test_wrong_dtype_is_refused(client, store, open_round):
    from safetensors.numpy import save

    headers, task = open_round
    tensors = {s.name: np.zeros(s.shape, np.float64) for s in SPEC}
    before = store.snapshot()
    assert_error(upload(client, headers, task["round_id"], save(tensors, {"num_examples": "1"})), 422, "wrong_dtype")
    assert store.snapshot() == before
    assert rejections(store) == [(task["round_id"], "wrong_dtype", 0)]


@pytest.mark.parametrize(
    "auth, code", [(None, "missing_token"), ("Bearer nope", "unknown_token"), ("Basic abc", "missing_token")]
)
def test_credentials_are_required(client, store, open_round, auth, code):
    _, task = open_round
    headers = {"Authorization": auth} if auth else {}
    before = store.snapshot()
    assert_error(upload(client, headers, task["round_id"], update_body()), 401, code)
    assert_error(client.post("/v1/checkin", headers=headers), 401, code)
    assert store.snapshot() == before
    assert rejections(store) == []  # nothing is written for a caller nobody knows


def test_a_device_not_selected_cannot_upload(client, store, open_round):
    _, task = open_round
    stranger = register(client)
    before = store.snapshot()
    assert_error(upload(client, stranger, task["round_id"], update_body()), 403, "not_selected")
    assert store.snapshot() == before
    assert rejections(store) == [(task["round_id"], "not_selected", 0)]


def test_second_upload_in_a_round_is_a_conflict(client, store, open_round):
    headers, task = open_round
    assert upload(client, headers, task["round_id"], update_body(seed=1)).status_code == 202
    before = store.snapshot()
    assert_error(upload(client, headers, task["round_id"], update_body(seed=2)), 409, "duplicate_update")
    assert store.snapshot() == before
    assert rejections(store) == [(task["round_id"], "duplicate_update", 0)]


def test_unknown_round_is_404(client, store, open_round):
    headers, _ = open_round
    before = store.snapshot()
    assert_error(upload(client, headers, 999, update_body()), 404, "unknown_round")
    assert store.snapshot() == before
    assert rejections(store) == []


def test_oversized_upload_is_413_before_reading(client, store, open_round):
    headers, task = open_round
    before = store.snapshot()
    huge = b"\x00" * (sum(s.nbytes for s in SPEC) + 2 * 1024 * 1024)
    assert_error(upload(client, headers, task["round_id"], huge), 413, "update_too_large")
    assert store.snapshot() == before
    assert rejections(store) == [(task["round_id"], "update_too_large", 0)]


def test_unknown_routes_and_methods_answer_json(client):
    assert_error(client.get("/v1/nothing"), 404, "not_found")
    assert_error(client.get("/v1/checkin"), 405, "method_not_allowed")
