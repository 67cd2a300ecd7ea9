"""SecAgg+'s four phases as pure functions: what a device computes from what it was
sent, and what the coordinator computes from what it collected.

1. Advertise keys: a device makes two X25519 key pairs (one to encrypt its shares,
   one to agree pairwise mask seeds) and a 256-bit self-mask seed; it sends the public
   keys.
2. Share keys: it splits its self-mask seed and its mask key t-of-k among its k
   neighbours, and seals each neighbour's pair of shares with a key only the two of
   them can derive (the coordinator routes the ciphertexts and cannot read them).
3. Masked input: it adds to its input, modulo 2^bits, the mask of its own seed and,
   for each neighbour that shared keys, the mask of their pairwise seed, added by the
   lower index and subtracted by the higher, so pairs cancel in the sum.
4. Unmask: for each neighbour that shared keys, it reveals the share of that
   neighbour's self-mask seed if the neighbour's masked input arrived, or the share of
   its mask key if it did not; never both. The coordinator recovers the survivors'
   self-mask seeds and the dropped devices' mask keys from t shares each, removes
   those masks, and holds the survivors' sum.

Devices are numbered 0 .. n - 1 by the round's participant list; every function
checks what it is given, and raises ``SecAggError`` for anything a dishonest peer or
coordinator could send.
"""

from __future__ import annotations

from collections.abc import Mapping, Set
from dataclasses import dataclass

import numpy as np

from edgefl.secagg import crypto, graph, shamir
from edgefl.secagg.crypto import SecAggError

SEED, KEY = "seed", "key"  # the two kinds of share a device may reveal for a neighbour
SEALED_PAIR_BYTES = crypto.SEALED_OVERHEAD + 2 * shamir.SHARE_BYTES  # what a device routes to each neighbour


@dataclass(frozen=True)
class RoundParams:
    """Everything public about one round's aggregation, fixed when it opens."""

    round_id: int
    devices: int  # participants, numbered 0 .. devices - 1
    size: int  # entries of each input vector
    bits: int  # the sum is taken modulo 2^bits
    degree: int
    threshold: int
    graph_seed: int

    def __post_init__(self) -> None:
        if not 1 <= self.threshold <= self.degree < self.devices:
            raise ValueError(f"need 1 <= threshold ({self.threshold}) <= degree ({self.degree}) < devices ({self.devices})")

    @property
    def neighbours(self) -> tuple[tuple[int, ...], ...]:
        return graph.neighbours(self.devices, self.degree, self.graph_seed)

    def position(self, owner: int, holder: int) -> int:
        """The Shamir x of ``holder``'s share of ``owner``'s secrets (1-based)."""
        try:
            return self.neighbours[owner].index(holder) + 1
        except ValueError:
            raise SecAggError(f"device {holder} is not a neighbour of device {owner}") from None

    def purpose(self, what: str) -> bytes:
        return f"round {self.round_id} {what}".encode()

    def route(self, sender: int, receiver: int) -> bytes:
        return f"round {self.round_id} from {sender} to {receiver}".encode()

    @property
    def modulus_mask(self) -> np.uint64:
        return np.uint64((1 << self.bits) - 1) if self.bits < 64 else np.uint64(0xFFFF_FFFF_FFFF_FFFF)


@dataclass(frozen=True)
class PublicKeys:
    encryption: bytes  # X25519, agrees the keys sealing shares
    masking: bytes  # X25519, agrees pairwise mask seeds


@dataclass(frozen=True)
class DeviceSecrets:
    """What a device keeps to itself for the round (never sent)."""

    index: int
    encryption: bytes
    masking: bytes
    self_seed: bytes

    @property
    def public(self) -> PublicKeys:
        return PublicKeys(crypto.public_key(self.encryption), crypto.public_key(self.masking))


def advertise(index: int) -> DeviceSecrets:
    """Phase 1: fresh keys and seed; send ``.public``."""
    return DeviceSecrets(index, crypto.new_private_key(), crypto.new_private_key(), crypto.new_seed())


def share_keys(params: RoundParams, me: DeviceSecrets, keys: Mapping[int, PublicKeys]) -> dict[int, bytes]:
    """Phase 2: a sealed pair of shares (self-mask seed, mask key) per neighbour that
    advertised, by receiver."""
    mine = params.neighbours[me.index]
    present = [v for v in mine if v in keys]
    if len(present) < params.threshold:
        raise SecAggError(f"only {len(present)} of device {me.index}'s neighbours advertised keys; {params.threshold} needed")
    seed_shares = shamir.split(me.self_seed, params.threshold, len(mine))
    key_shares = shamir.split(me.masking, params.threshold, len(mine))
    sealed = {}
    for position, v in enumerate(mine):
        if v in keys:
            channel = crypto.agree(me.encryption, keys[v].encryption, params.purpose("shares"))
            sealed[v] = crypto.seal(channel, seed_shares[position] + key_shares[position], params.route(me.index, v))
    return sealed


def _pairwise_seed(params: RoundParams, private: bytes, peer_public: bytes) -> bytes:
    return crypto.agree(private, peer_public, params.purpose("masks"))


def masked_input(
    params: RoundParams, me: DeviceSecrets, keys: Mapping[int, PublicKeys], shared: Set[int], value: np.ndarray
) -> np.ndarray:
    """Phase 3: ``value`` (integers below 2^bits) plus the self mask and, for each
    neighbour in ``shared`` (the devices whose shares were routed), the pairwise mask."""
    value = np.asarray(value)
    if value.shape != (params.size,) or value.dtype != np.uint64:
        raise ValueError(f"the input must be {params.size} uint64 values")
    if int(value.max(initial=0)) > int(params.modulus_mask):
        raise ValueError(f"the input must be below 2^{params.bits}")
    if me.index not in shared:
        raise SecAggError(f"device {me.index}'s own shares were not routed")
    y = value.copy()
    crypto.add_mask(y, me.self_seed)
    for v in params.neighbours[me.index]:
        if v in shared:
            crypto.add_mask(y, _pairwise_seed(params, me.masking, keys[v].masking), subtract=me.index > v)
    y &= params.modulus_mask
    return y


def unmask(
    params: RoundParams,
    me: DeviceSecrets,
    keys: Mapping[int, PublicKeys],
    received: Mapping[int, bytes],
    shared: Set[int],
    masked: Set[int],
) -> dict[int, tuple[str, bytes]]:
    """Phase 4: for each neighbour that sent this device its shares, the share of its
    self-mask seed if its masked input arrived (in ``masked``), else of its mask key.
    Refuses if ``masked`` is not within ``shared``, or if fewer than the threshold of
    its neighbours' inputs arrived (a coordinator claiming dropouts to learn more)."""
    if not masked <= shared:
        raise SecAggError("devices whose input arrived must have shared keys")
    mine = params.neighbours[me.index]
    if sum(1 for v in mine if v in masked) < params.threshold:
        raise SecAggError(f"fewer than {params.threshold} of device {me.index}'s neighbours sent masked inputs")
    revealed = {}
    for v in mine:
        if v not in shared or v not in received:
            continue
        channel = crypto.agree(me.encryption, keys[v].encryption, params.purpose("shares"))
        pair = crypto.open_sealed(channel, received[v], params.route(v, me.index))
        if len(pair) != 2 * shamir.SHARE_BYTES:
            raise SecAggError(f"device {v}'s shares have the wrong length")
        revealed[v] = (SEED, pair[: shamir.SHARE_BYTES]) if v in masked else (KEY, pair[shamir.SHARE_BYTES :])
    return revealed


def aggregate(
    params: RoundParams,
    keys: Mapping[int, PublicKeys],
    shared: Set[int],
    inputs: Mapping[int, np.ndarray],
    revealed: Mapping[int, Mapping[int, tuple[str, bytes]]],
) -> np.ndarray:
    """The coordinator's last step: the sum, modulo 2^bits, of the inputs of the
    devices in ``inputs`` (the masked inputs that arrived), from the shares its
    neighbours ``revealed`` (by revealing device, then owner). A share of the wrong
    kind for its owner, or too few shares for any owner, is refused."""
    total = np.zeros(params.size, np.uint64)
    for y in inputs.values():
        total += y
    return remove_masks(params, keys, shared, set(inputs), total, revealed)


def remove_masks(
    params: RoundParams,
    keys: Mapping[int, PublicKeys],
    shared: Set[int],
    masked: Set[int],
    total: np.ndarray,
    revealed: Mapping[int, Mapping[int, tuple[str, bytes]]],
) -> np.ndarray:
    """``aggregate`` given the (wrapping) sum of the masked inputs of the devices in
    ``masked``, so a coordinator may add them up as they arrive, holding one vector."""
    dropped = shared - masked
    total = np.array(total, np.uint64)
    for owner in sorted(masked | dropped):
        wanted = SEED if owner in masked else KEY
        shares = {}
        for holder, by_owner in revealed.items():
            if owner in by_owner:
                kind, share = by_owner[owner]
                if kind != wanted:
                    raise SecAggError(f"device {holder} revealed a {kind} share of device {owner}; only {wanted} was asked")
                shares[params.position(owner, holder)] = share
        secret = shamir.combine(shares, params.threshold)
        if owner in masked:
            crypto.add_mask(total, secret, subtract=True)
            continue
        for v in params.neighbours[owner]:  # the pairwise masks the survivors added for the dropped device
            if v in masked:
                crypto.add_mask(total, _pairwise_seed(params, secret, keys[v].masking), subtract=v < owner)
    return total & params.modulus_mask
