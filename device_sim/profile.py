"""A fleet profile: how the devices of a fleet behave like phones, seeded and reproducible.

Bonawitz et al. (2019, "Towards federated learning at scale") describe what a real
fleet does to a round: a phone is eligible only while it is idle, charging and on an
unmetered network, which follows the time of day; it drops out when that changes; phones
differ in speed and in upload bandwidth; requests fail. A profile declares those
behaviours once (TOML, one table per behaviour; every key has a default), and
``behaviour_of`` draws each device's own share of them from (seed, index), so the same
profile, seed and index give the same device on any host.

Every key left out has no effect: a profile file says only what it changes, and a fleet
without a profile is always available and never fails. ``phone`` names the profile
shipped with edgefl (``device_sim/profiles/phone.toml``), which turns every behaviour on.

The rest is pure functions of a device's behaviour and the fleet's clock (seconds since
the fleet started): whether it is eligible now, when it next is, whether it drops out of
a round, how much longer than this machine it computes and how long its upload takes.
The agent asks them; ``device_sim.network`` makes requests fail and crawl.
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass, fields
from functools import lru_cache
from pathlib import Path

import numpy as np

from edgefl.config import Setting, declared, setting

PROFILES_DIR = Path(__file__).parent / "profiles"


@dataclass(frozen=True, kw_only=True)
class Availability:
    """Eligible ("idle, charging, unmetered") while the diurnal curve is above the device's own threshold."""

    day_s: float = setting(86_400.0, "length of one simulated day in seconds", low=0, high=1e9, above_low=True)
    peak: float = setting(1.0, "fraction of devices eligible at the best time of day", low=0, high=1)
    trough: float = setting(1.0, "fraction of devices eligible at the worst time of day (12 hours later)", low=0, high=1)
    start: float = setting(0.0, "time of day the fleet starts at, as a fraction of the day (0: the peak)", low=0, high=1)
    spread: float = setting(0.0, "spread of the devices' time zones, as a fraction of the day", low=0, high=1)


@dataclass(frozen=True, kw_only=True)
class Dropout:
    rate: float = setting(0.0, "chance that a selected device drops out of the round before it reports", low=0, high=1)


@dataclass(frozen=True, kw_only=True)
class Speed:
    median: float = setting(1.0, "median time a device needs to train, as a multiple of this machine's", low=1, high=1000)
    sigma: float = setting(
        0.0, "log-normal spread of those multiples (a device is never faster than this machine)", low=0, high=5
    )


@dataclass(frozen=True, kw_only=True)
class Network:
    failure_rate: float = setting(
        0.0, "chance that a request is lost: before the coordinator sees it, or its answer on the way back", low=0, high=0.9
    )
    slow_rate: float = setting(0.0, "chance that a request is slow", low=0, high=1)
    slow_s: float = setting(0.0, "seconds a slow request takes longer", low=0, high=600)


@dataclass(frozen=True, kw_only=True)
class Upload:
    kbps_median: float = setting(0.0, "median upload bandwidth in kilobits per second (0: unlimited)", low=0, high=1e9)
    kbps_sigma: float = setting(0.0, "log-normal spread of the devices' upload bandwidths", low=0, high=5)


_TABLES = {"availability": Availability, "dropout": Dropout, "speed": Speed, "network": Network, "upload": Upload}


@dataclass(frozen=True, kw_only=True)
class FleetProfile:
    availability: Availability = Availability()
    dropout: Dropout = Dropout()
    speed: Speed = Speed()
    network: Network = Network()
    upload: Upload = Upload()

    def __post_init__(self) -> None:
        if self.availability.trough > self.availability.peak:
            raise ValueError("availability.trough must not exceed availability.peak")


class ProfileError(ValueError):
    pass


def _table(cls: type, values: object, where: str) -> object:
    if not isinstance(values, dict):
        raise ProfileError(f"{where}: must be a table of settings")
    declarations: dict[str, tuple[type, Setting]] = {name: (kind, rule) for name, kind, rule, _ in declared(cls)}
    checked = {}
    for key, value in values.items():
        if key not in declarations:
            raise ProfileError(f"{where}: unknown setting {key!r} (known: {', '.join(declarations)})")
        kind, rule = declarations[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ProfileError(f"{where}.{key} must be a number")
        try:
            number = float(value)
        except OverflowError:  # an integer past what a float holds
            number = math.inf
        if problem := rule.problem(number):
            raise ProfileError(f"{where}.{key} {problem}")
        checked[key] = kind(value)
    return cls(**checked)


def parse_profile(text: str, where: str = "the profile") -> FleetProfile:
    """A profile from TOML text; ProfileError names the table and key that do not fit."""
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ProfileError(f"{where} is not TOML: {exc}") from None
    unknown = set(document) - set(_TABLES)
    if unknown:
        raise ProfileError(f"{where}: unknown table [{sorted(unknown)[0]}] (known: {', '.join(_TABLES)})")
    tables = {name: _table(cls, document[name], f"{where}: {name}") for name, cls in _TABLES.items() if name in document}
    try:
        return FleetProfile(**tables)
    except ValueError as exc:
        raise ProfileError(f"{where}: {exc}") from None


@lru_cache(maxsize=8)
def load_profile(reference: str) -> FleetProfile:
    """``""`` (ideal devices), a shipped profile's name (``phone``) or a TOML file."""
    if not reference:
        return FleetProfile()
    path = PROFILES_DIR / f"{reference}.toml" if "/" not in reference and not reference.endswith(".toml") else Path(reference)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        shipped = ", ".join(p.stem for p in sorted(PROFILES_DIR.glob("*.toml")))
        raise ProfileError(
            f"cannot read fleet profile {reference} ({getattr(exc, 'strerror', None) or exc}; shipped: {shipped})"
        ) from None
    return parse_profile(text, str(reference))


def profile_problem(reference: str) -> str | None:
    """Why ``reference`` names no usable profile, or None (a device setting's check)."""
    try:
        load_profile(reference)
    except ProfileError as exc:
        return f"is not usable: {exc}"
    return None


@dataclass(frozen=True)
class DeviceBehaviour:
    """One device's draw from its fleet's profile."""

    profile: FleetProfile
    threshold: float  # eligible while the diurnal curve is above it
    offset_s: float  # its time zone, against the fleet's clock
    slowdown: float  # its training takes this many times as long as this machine's
    upload_kbps: float  # 0: unlimited

    def eligible(self, t: float) -> bool:
        """Idle, charging and unmetered at ``t`` seconds into the fleet's run."""
        a = self.profile.availability
        phase = (t + self.offset_s) / a.day_s + a.start
        level = a.trough + (a.peak - a.trough) * (1 + math.cos(2 * math.pi * phase)) / 2
        return self.threshold < level

    def next_eligible(self, t: float) -> float:
        """The first time from ``t`` on at which the device is eligible (``t`` itself if it is)."""
        if self.eligible(t):
            return t
        step = self.profile.availability.day_s / 288  # five simulated minutes
        for k in range(1, 289):
            if self.eligible(t + k * step):
                return t + k * step
        return math.inf  # its threshold is above the whole curve: never eligible

    def drops_out(self, seed: int, index: int, round_id: int) -> bool:
        """Whether it leaves round ``round_id`` before reporting (the same answer every time it is asked)."""
        rate = self.profile.dropout.rate
        return rate > 0 and np.random.default_rng([seed, index, round_id, 1]).random() < rate

    def extra_compute_s(self, trained_s: float) -> float:
        """How much longer than ``trained_s`` (this machine's time) the device computes."""
        return trained_s * (self.slowdown - 1)

    def upload_s(self, size: int) -> float:
        return size * 8 / (self.upload_kbps * 1000) if self.upload_kbps else 0.0


def behaviour_of(profile: FleetProfile, seed: int, index: int) -> DeviceBehaviour:
    """Device ``index``'s behaviour, drawn from (seed, index) alone."""
    rng = np.random.default_rng([seed, index, 0x9E0F11E])
    threshold, zone, speed, bandwidth = rng.random(), rng.standard_normal(), rng.standard_normal(), rng.standard_normal()
    a = profile.availability
    return DeviceBehaviour(
        profile=profile,
        threshold=threshold,
        offset_s=zone * a.spread * a.day_s,
        slowdown=max(1.0, profile.speed.median * math.exp(profile.speed.sigma * speed)),
        upload_kbps=profile.upload.kbps_median * math.exp(profile.upload.kbps_sigma * bandwidth),
    )


def describe(profile: FleetProfile) -> str:
    """The profile's settings that differ from an ideal fleet's, one line."""
    ideal = FleetProfile()
    changed = [
        f"{table}.{f.name}={getattr(getattr(profile, table), f.name):g}"
        for table in _TABLES
        for f in fields(getattr(profile, table))
        if getattr(getattr(profile, table), f.name) != getattr(getattr(ideal, table), f.name)
    ]
    return ", ".join(changed) or "ideal devices"
