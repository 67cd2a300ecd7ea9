"""A client of the /v1 protocol (devices, export, the CLI), with the retries a phone on a bad network needs.

Connection errors, timeouts, 5xx and 429 (too many requests) answers are retried with
capped exponential backoff and full jitter (honouring Retry-After), so a coordinator
restart or a burst of load costs a device time, not its work. Other 4xx answers are
final and raised as ``ProtocolError`` with the server's error code.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import time
from dataclasses import dataclass
from typing import TypeVar

import pydantic
import requests
import requests.adapters

from edgefl.protocol import (
    Answer,
    CheckinAnswer,
    DeviceRegistration,
    RoundsAnswer,
    RunStatus,
    SecAggAccepted,
    SecAggKeys,
    SecAggRequest,
    SecAggReveal,
    SecAggShares,
    SecAggView,
    UpdateAccepted,
)

log = logging.getLogger("edgefl.client")

_BACKOFF_BASE_S = 0.2
_BACKOFF_CAP_S = 5.0
_TIMEOUT_S = (5.0, 60.0)
_READ_CHUNK_BYTES = 1 << 20  # requests' default of 10 KB makes a 6.6 MB checkpoint cost 4x the CPU


A = TypeVar("A", bound=Answer)


class ProtocolError(Exception):
    def __init__(self, status: int, code: str, detail: str):
        super().__init__(f"{status} {code}: {detail}")
        self.status = status
        self.code = code


class CoordinatorUnreachable(Exception):
    pass


@dataclass
class Traffic:
    bytes_down: int = 0
    bytes_up: int = 0


@dataclass(frozen=True)
class TrainingModel:
    sha256: str
    data: bytes
    batch_size: int


class CoordinatorClient:
    def __init__(
        self,
        base_url: str,
        *,
        give_up_after_s: float = 120.0,
        rng: random.Random | None = None,
        transport: requests.adapters.BaseAdapter | None = None,
        backoff_cap_s: float = _BACKOFF_CAP_S,
    ):
        """``transport`` carries the requests instead of requests' own (a simulated
        phone network, whose ``faults`` it counts)."""
        self.base_url = base_url.rstrip("/")
        self.give_up_after_s = give_up_after_s
        self.backoff_cap_s = backoff_cap_s
        self.token: str | None = None
        self.device_id: str | None = None
        self.traffic = Traffic()
        self._session = requests.Session()
        self._transport = transport
        if transport is not None:
            self._session.mount("http://", transport)
            self._session.mount("https://", transport)
        self._rng = rng or random.Random()

    def _request(self, method: str, path: str, **kwargs) -> tuple[requests.Response, bytes]:
        """The response and its whole body, read inside the retry loop."""
        headers = kwargs.pop("headers", {})
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        deadline = time.monotonic() + self.give_up_after_s
        attempt = 0
        while True:
            wait = None
            try:
                response = self._session.request(
                    method, self.base_url + path, headers=headers, timeout=_TIMEOUT_S, stream=True, **kwargs
                )
                with response:
                    body = b"".join(response.iter_content(_READ_CHUNK_BYTES))
                if response.status_code < 500 and response.status_code != 429:
                    break
                retry_after = response.headers.get("Retry-After", "")
                wait = float(retry_after) if retry_after.replace(".", "", 1).isdigit() else None
                problem = f"HTTP {response.status_code}"
            except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError) as exc:
                problem = type(exc).__name__
            except requests.RequestException as exc:  # a malformed URL: retrying cannot help
                raise ProtocolError(0, "bad_url", f"cannot request {self.base_url}{path}: {exc}") from None
            if time.monotonic() >= deadline:
                raise CoordinatorUnreachable(
                    f"{method} {self.base_url}{path} failed for {self.give_up_after_s:.0f}s (last: {problem})"
                )
            backoff = min(self.backoff_cap_s, _BACKOFF_BASE_S * 2**attempt) * self._rng.random()
            pause = min(wait if wait is not None else backoff, max(0.0, deadline - time.monotonic()))
            log.debug("%s %s failed (%s); retrying in %.2fs", method, path, problem, pause)
            time.sleep(pause)
            attempt += 1
        if response.status_code >= 400:
            try:
                error = json.loads(body)
                code, detail = error.get("error", "error"), error.get("detail", "")
            except (ValueError, AttributeError):
                code, detail = "error", body[:200].decode(errors="replace")
            raise ProtocolError(response.status_code, code, detail)
        return response, body

    def _answer(self, model: type[A], method: str, path: str, **kwargs) -> A:
        """The coordinator's answer as the protocol's ``model`` (edgefl.protocol)."""
        response, body = self._request(method, path, **kwargs)
        try:
            return model.model_validate_json(body)
        except pydantic.ValidationError as error:
            problem = error.errors()[0]
            raise ProtocolError(
                response.status_code, "bad_answer", f"{path} answered no {model.__name__}: {problem['msg']}"
            ) from None

    @property
    def network_faults(self) -> int:
        """Requests its transport lost or slowed (0 on requests' own)."""
        return sum(getattr(self._transport, "faults", {}).values())

    def register(self, enrolment_secret: str | None = None) -> str:
        """Register as a new device (with the coordinator's enrolment secret, if it has one)."""
        headers = {"Authorization": f"Bearer {enrolment_secret}"} if enrolment_secret else {}
        registration = self._answer(DeviceRegistration, "POST", "/v1/devices", headers=headers)
        self.device_id, self.token = registration.device_id, registration.token
        return self.device_id

    def checkin(self) -> CheckinAnswer:
        return self._answer(CheckinAnswer, "POST", "/v1/checkin")

    def download_checkpoint(self, sha256: str) -> bytes:
        _, data = self._request("GET", f"/v1/checkpoints/{sha256}")
        if hashlib.sha256(data).hexdigest() != sha256:
            raise ProtocolError(200, "corrupt_checkpoint", f"checkpoint {sha256[:12]} does not hash to its name")
        self.traffic.bytes_down += len(data)
        return data

    def download_training_model(self, cached: TrainingModel | None = None) -> TrainingModel:
        """The coordinator's newest on-device training file, or ``cached`` if that is it
        still (ETag). Retried while the coordinator is still building the first one."""
        headers = {"If-None-Match": f'"{cached.sha256}"'} if cached else {}
        response, data = self._request("GET", "/v1/models/latest-train.tflite", headers=headers)
        if response.status_code == 304 and cached:
            return cached
        sha256 = hashlib.sha256(data).hexdigest()
        if response.headers.get("ETag", "").strip('"') != sha256:
            raise ProtocolError(200, "corrupt_model", "the training model does not hash to its ETag")
        self.traffic.bytes_down += len(data)
        return TrainingModel(sha256, data, int(response.headers["X-Edgefl-Train-Batch"]))

    def upload_update(self, round_id: int, body: bytes) -> UpdateAccepted:
        answer = self._answer(
            UpdateAccepted,
            "POST",
            f"/v1/rounds/{round_id}/updates",
            data=body,
            headers={"Content-Type": "application/octet-stream"},
        )
        self.traffic.bytes_up += len(body)
        return answer

    def secagg_view(self, round_id: int, seen: str | None = None) -> SecAggView:
        """A secure round's view for this device; held while the round is in ``seen``."""
        return self._answer(SecAggView, "GET", f"/v1/rounds/{round_id}/secagg", params={"seen": seen} if seen else None)

    def secagg_send(self, round_id: int, message: SecAggRequest | bytes) -> SecAggAccepted:
        """A secure round's message: its keys, shares or reveal (JSON), or its masked input (bytes)."""
        if isinstance(message, bytes):
            kind, body, headers = "masked", message, {"Content-Type": "application/octet-stream"}
        else:
            kind = {SecAggKeys: "keys", SecAggShares: "shares", SecAggReveal: "reveal"}[type(message)]
            body, headers = message.model_dump_json().encode(), {"Content-Type": "application/json"}
        answer = self._answer(SecAggAccepted, "POST", f"/v1/rounds/{round_id}/secagg/{kind}", data=body, headers=headers)
        self.traffic.bytes_up += len(body)
        return answer

    def status(self) -> RunStatus:
        return self._answer(RunStatus, "GET", "/v1/status")

    def rounds(self) -> RoundsAnswer:
        return self._answer(RoundsAnswer, "GET", "/v1/rounds")
