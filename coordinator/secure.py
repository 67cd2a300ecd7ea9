"""A secure round's SecAgg+ state as the store holds it: its public parameters, what
each device is sent, the checks on what each device sends, and the unmasked sum.

Every protocol message is a blob named by a row of ``messages`` (kind keys, shares,
masked or reveal, in the plan's phase of the same name), so a coordinator restarted
in any phase rebuilds all of this from the store. The coordinator holds only public
keys, shares sealed for other devices, masked inputs and, at the end, the shares that
remove the masks of the sum: never one device's input. Devices are numbered by the
order their keys arrived; the neighbour graph is seeded by a hash of all the keys,
so it is fixed, and the same for every reader, once the keys phase has closed.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from coordinator.database import Connection
from coordinator.errors import ApiError
from coordinator.lifecycle import MessageKind
from edgefl.config import RunConfig
from edgefl.protocol import SecAggKeys, SecAggReveal, SecAggShares
from edgefl.secagg import graph, packing, shamir
from edgefl.secagg import protocol as secagg
from edgefl.secagg.quantize import CODE_BITS

_parsed: dict[str, object] = {}  # blobs are named by their sha256, so what one holds never changes


def _blob_json(read: Callable[[str], bytes], sha256: str, model: type) -> object:
    if sha256 not in _parsed:
        if len(_parsed) > 100_000:
            _parsed.clear()
        _parsed[sha256] = model.model_validate_json(read(sha256))
    return _parsed[sha256]


@dataclass(frozen=True)
class SecureRound:
    """One secure round's public state, from its keys on (reads its other messages lazily)."""

    db: Connection
    read: Callable[[str], bytes]  # a blob's bytes by sha256
    round_id: int
    device_ids: tuple[str, ...]  # by index
    keys: dict[int, secagg.PublicKeys]
    params: secagg.RoundParams

    @classmethod
    def load(cls, db: Connection, read: Callable[[str], bytes], config: RunConfig, round_id: int, size: int) -> SecureRound:
        """The round's state once its keys phase has closed (ValueError if too few advertised)."""
        rows = _messages(db, round_id, MessageKind.KEYS)
        advertised = [(row["device_id"], _blob_json(read, row["blob_sha256"], SecAggKeys)) for row in rows]
        keys = {
            i: secagg.PublicKeys(bytes.fromhex(k.encryption), bytes.fromhex(k.masking)) for i, (_, k) in enumerate(advertised)
        }
        n = len(advertised)
        degree, threshold = graph.round_shape(n, config.secagg_degree, config.secagg_threshold)
        digest = hashlib.sha256(b"".join(k.encryption + k.masking for k in keys.values())).digest()
        params = secagg.RoundParams(
            round_id=round_id,
            devices=n,
            size=size,
            bits=packing.sum_bits(CODE_BITS, n),
            degree=degree,
            threshold=threshold,
            graph_seed=int.from_bytes(digest[:8], "little"),
        )
        return cls(db, read, round_id, tuple(d for d, _ in advertised), keys, params)

    @cached_property
    def index_of(self) -> dict[str, int]:
        return {device_id: i for i, device_id in enumerate(self.device_ids)}

    def index(self, device_id: str) -> int:
        if device_id not in self.index_of:
            raise ApiError(409, "not_a_survivor", f"This device advertised no keys in round {self.round_id}.")
        return self.index_of[device_id]

    def _senders(self, kind: MessageKind) -> dict[int, str]:
        """The devices that sent a message of ``kind``, by index: the blob of each."""
        return {self.index_of[row["device_id"]]: row["blob_sha256"] for row in _messages(self.db, self.round_id, kind)}

    def shares_for(self, index: int) -> dict[int, str]:
        """The sealed shares routed to device ``index``, by sender (hex)."""
        found = {}
        for sender, sha256 in self._senders(MessageKind.SHARES).items():
            if index in self.params.neighbours[sender]:
                found[sender] = _blob_json(self.read, sha256, SecAggShares).shares[index]
        return found

    @property
    def shared(self) -> set[int]:
        return set(self._senders(MessageKind.SHARES))

    @property
    def masked(self) -> set[int]:
        return set(self._senders(MessageKind.MASKED))

    # --- the checks on what a device sends (422 and nothing stored, or nothing) ----

    def check_shares(self, index: int, body: SecAggShares) -> None:
        """One sealed pair for each of the device's neighbours, and for no one else."""
        wanted = set(self.params.neighbours[index])
        if set(body.shares) != wanted:
            raise ApiError(
                422, "misrouted_shares", f"Send one sealed pair to each of this device's neighbours: {sorted(wanted)}."
            )
        for receiver, sealed in body.shares.items():
            _hex_of_length(sealed, secagg.SEALED_PAIR_BYTES, f"the sealed pair for device {receiver}", "bad_shares")

    def check_masked(self, body: bytes) -> None:
        problem = packing.problem(body, self.params.size, self.params.bits)
        if problem:
            raise ApiError(422, "bad_masked_input", f"{problem[0].upper()}{problem[1:]}.")

    def check_reveal(self, index: int, body: SecAggReveal) -> dict[int, tuple[str, bytes]]:
        """The shares the device was asked for: of the self-mask seed of each neighbour
        whose masked input arrived, of the mask key of each that shared keys and sent
        no input; exactly those, so the coordinator never holds both for one device."""
        neighbours = set(self.params.neighbours[index])
        shared, masked = self.shared & neighbours, self.masked & neighbours
        if set(body.seeds) != masked or set(body.keys) != shared - masked:
            raise ApiError(
                422,
                "wrong_reveal",
                f"Reveal seed shares for exactly the neighbours {sorted(masked)} and key shares for exactly"
                f" {sorted(shared - masked)}.",
            )
        revealed = {}
        for kind, shares in ((secagg.SEED, body.seeds), (secagg.KEY, body.keys)):
            for owner, share in shares.items():
                revealed[owner] = (kind, _hex_of_length(share, shamir.SHARE_BYTES, f"the share of device {owner}", "bad_reveal"))
        return revealed

    # --- the coordinator's last step ------------------------------------------------

    def add_masked_inputs(self, total: np.ndarray, after_id: int = 0) -> int:
        """Add to ``total`` (in place, wrapping) the masked inputs stored after message
        ``after_id``, one at a time; the id of the last one added (``after_id`` if none)."""
        rows = self.db.execute(
            "SELECT id, blob_sha256 FROM messages WHERE round_id = ? AND kind = ? AND id > ? ORDER BY id",
            (self.round_id, MessageKind.MASKED, after_id),
        ).fetchall()
        for row in rows:
            total += packing.unpack(self.read(row["blob_sha256"]), self.params.size, self.params.bits)
            after_id = row["id"]
        return after_id

    def unmasked_sum(self, total: np.ndarray | None = None, through_id: int = 0) -> np.ndarray:
        """The survivors' inputs summed (exactly: the modulus holds the sum), from their
        masked inputs (``total``: those up to message ``through_id``, already added up as
        they arrived) and the revealed shares. SecAggError if any device's secrets
        cannot be recovered from what was revealed."""
        total = np.zeros(self.params.size, np.uint64) if total is None else total.copy()
        self.add_masked_inputs(total, through_id)
        revealed = {}
        for holder, sha256 in self._senders(MessageKind.REVEAL).items():
            revealed[holder] = self.check_reveal(holder, SecAggReveal.model_validate_json(self.read(sha256)))
        return secagg.remove_masks(self.params, self.keys, self.shared, self.masked, total, revealed)

    def figures(self) -> dict:
        """What the round's record says of its protocol (counts, never contents)."""
        return {
            "advertised": self.params.devices,
            "shared": len(self.shared),
            "masked": len(self.masked),
            "revealed": len(self._senders(MessageKind.REVEAL)),
            "degree": self.params.degree,
            "threshold": self.params.threshold,
            "bits": self.params.bits,
        }


def keys_in_use(db: Connection, read: Callable[[str], bytes], round_id: int, body: SecAggKeys) -> bool:
    """Whether another device of the round advertised either of these keys (a replay)."""
    mine = {body.encryption, body.masking}
    for row in _messages(db, round_id, MessageKind.KEYS):
        theirs = _blob_json(read, row["blob_sha256"], SecAggKeys)
        if mine & {theirs.encryption, theirs.masking}:
            return True
    return False


def encode(message) -> bytes:
    """A JSON message as the blob that keeps it."""
    return json.dumps(message.model_dump(mode="json"), sort_keys=True).encode()


def _messages(db: Connection, round_id: int, kind: MessageKind):
    return db.execute(
        "SELECT device_id, blob_sha256 FROM messages WHERE round_id = ? AND kind = ? ORDER BY id", (round_id, kind)
    ).fetchall()


def _hex_of_length(text: str, length: int, what: str, code: str) -> bytes:
    try:
        data = bytes.fromhex(text)
    except ValueError:
        data = b""
    if len(data) != length or text != data.hex():
        raise ApiError(422, code, f"{what[0].upper()}{what[1:]} must be {length} bytes in lowercase hex.")
    return data
