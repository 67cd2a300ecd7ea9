"""The OpenAPI document at /v1/openapi.json, and schemathesis fuzzing the API from it.

Every generated request goes through the real app over a real store (SQLite, then a
PostgreSQL server) with a run, an open round and a selected device, with a device
token, the admin token or none. No
answer may be a 5xx or break the document's promises, and every rejected request
(4xx) must leave the store exactly as it was.
"""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis import checks

from tests.api_helpers import ADMIN, administered, register, take_task

# What the document promises, checked on every answer. Not schemathesis's auth and
# data-acceptance probes: this test chooses each request's credentials itself.
PROMISES = [
    checks.not_a_server_error,
    checks.status_code_conformance,
    checks.content_type_conformance,
    checks.response_schema_conformance,
    checks.response_headers_conformance,
    checks.allow_header_conformance,
    checks.unsupported_method,
]

pytestmark = pytest.mark.slow

CALLS: dict[str, dict[str, int]] = {}


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def fuzzed(request, tmp_path_factory, small_parts):
    from edgefl.config import RunConfig

    db_url = request.getfixturevalue("postgres").new_database() if request.param == "postgresql" else None
    config = RunConfig(model="cnn_small", rounds=3, target_reports=50, min_reports=50, round_timeout_s=3600)
    app, driver = administered(tmp_path_factory.mktemp("fuzz"), small_parts, config, db_url)
    client = app.test_client()
    device = register(client)
    assert driver.step()  # round 1 opens
    take_task(client, device)
    publish_artefacts(app.extensions["edgefl.store"], tmp_path_factory.mktemp("publish"))  # else /v1/models/* are 503
    calls = CALLS.setdefault(request.param, {"requests": 0, "rejected": 0})
    yield app, device, calls
    # Once every generated request of this database has run, in whatever order: enough of them.
    if any(
        item.originalname == test_fuzzed_requests_get_no_5xx_and_rejections_change_nothing.__name__
        for item in request.session.items
    ):
        print(f"schemathesis on {request.param}: {calls}")
        assert calls["requests"] >= 500 and calls["rejected"] > 0, calls


def publish_artefacts(store, log_dir) -> None:
    from contextlib import closing

    from coordinator.artefacts import Publisher, wanted
    from edgefl.app.launcher import edgefl_command

    with closing(store.connect()) as db:
        target = wanted(db)
    assert Publisher(store, edgefl_command("export"), log_dir / "publish.log").build(target)


@pytest.fixture(scope="module")
def fuzzed_app(fuzzed):
    return fuzzed[0]


@pytest.fixture(scope="module")
def openapi_schema(fuzzed_app):
    return schemathesis.openapi.from_wsgi("/v1/openapi.json", fuzzed_app)


api_schema = schemathesis.pytest.from_fixture("openapi_schema")


@api_schema.parametrize()
@settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck))
def test_fuzzed_requests_get_no_5xx_and_rejections_change_nothing(case, fuzzed):
    app, device, calls = fuzzed
    store = app.extensions["edgefl.store"]
    headers = (device, ADMIN, {})[calls["requests"] % 3]
    before = store.snapshot()
    response = case.call(headers=headers)
    calls["requests"] += 1
    case.validate_response(response, checks=PROMISES)
    assert response.status_code < 500, response.text
    if response.status_code >= 400:
        calls["rejected"] += 1
        assert store.snapshot() == before, f"{case.method} {case.formatted_path} -> {response.status_code} changed the store"


def test_the_document_is_openapi_3_with_every_endpoint(fuzzed_app):
    document = fuzzed_app.test_client().get("/v1/openapi.json").json
    assert document["openapi"].startswith("3.")
    assert set(document["paths"]) == {
        "/v1/devices",
        "/v1/checkin",
        "/v1/checkpoints/{sha256}",
        "/v1/rounds/{round_id}/updates",
        "/v1/rounds",
        "/v1/status",
        "/v1/admin/{action}",
        "/v1/admin/config",
        "/v1/models/latest.tflite",
        "/v1/models/latest-train.tflite",
        "/v1/models/latest.json",
        "/v1/rounds/{round_id}/secagg",
        "/v1/rounds/{round_id}/secagg/keys",
        "/v1/rounds/{round_id}/secagg/shares",
        "/v1/rounds/{round_id}/secagg/masked",
        "/v1/rounds/{round_id}/secagg/reveal",
    }
    upload = document["paths"]["/v1/rounds/{round_id}/updates"]["post"]
    assert "application/octet-stream" in upload["requestBody"]["content"] and upload["security"] == [{"deviceToken": []}]
    assert set(document["components"]["securitySchemes"]) == {"deviceToken", "adminToken", "enrolmentSecret"}
