"""Device settings, declared once.

Each field of ``DeviceSettings`` carries its help text, its flag and the values it
accepts (``edgefl.config.Setting``, as the run configuration does). Everything else is
derived from these declarations: the device host's command line (``command_line``), its
argument parser (``add_arguments``), the ``edgefl devices`` flags (``edgefl.app.flags``)
and the checks of every value, so a new setting cannot be forgotten on one path and
silently run with its default on another.

The settings are what the devices of one fleet share; what is a device's own (its index
in the population, its runtime) follows from them: ``runtime`` may be a comma-separated
list that is cycled over the population by index.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from device_sim.profile import profile_problem
from edgefl.config import Setting, declared, flag_for, setting, values_of
from edgefl.datasets import dataset_problem
from edgefl.models import model_problem
from edgefl.partition import PartitionSpec

RUNTIMES = ("keras", "litert")
DEFAULT_COORDINATOR = "http://127.0.0.1:8080"  # every command's default (edgefl.app.flags)


@dataclass(frozen=True, kw_only=True)
class DeviceSettings:
    coordinator: str = setting(DEFAULT_COORDINATOR, "coordinator URL")
    num_devices: int = setting(1, "size of the population the data is split over", low=1, high=10_000_000)
    dataset: str = setting("digits", "dataset the devices' shards come from (see README: Your own data)", check=dataset_problem)
    partition: str = setting(
        "dirichlet:0.5",
        "iid, dirichlet:ALPHA, classes:K or natural (one writer per device), each optionally +style (a handwriting"
        " style per device)",
    )
    seed: int = setting(0, "seed of the partition", flag="data-seed", low=0, high=2**32 - 1)
    model: str = setting(
        "",
        "the run's model when it is not a built-in (file.py:fn, module:fn or .keras, as serve was given it): a Keras"
        " device builds no other, since building a model runs its code",
        check=lambda reference: model_problem(reference) if reference else None,
    )
    runtime: str = setting(
        "keras",
        "what devices train with: keras, litert (the on-device .tflite through LiteRT, no TensorFlow), or a"
        " comma-separated list cycled over the devices, e.g. keras,litert",
    )
    holdout: float = setting(
        0.2,
        "fraction of each device's examples kept out of training to report global vs personalised accuracy; 0: no reports",
        low=0,
        high=1,
        below_high=True,
    )
    profile: str = setting(
        "",
        "fleet profile of phone behaviour (availability, dropout, speed, network, upload): 'phone' or a TOML file (see"
        " README: A fleet of phones); empty: devices always eligible and never failing",
        check=lambda reference: profile_problem(reference) if reference else None,
    )
    # With 2, ten one-device processes on two cores spent ~8% longer per round.
    threads: int = setting(1, "CPU threads per device process: its training threads, and TensorFlow's", low=1, high=256)

    def __post_init__(self) -> None:
        problems = [f"{flag_of(name)} {problem}" for name, value, s in self.settings() if (problem := s.problem(value))]
        if not all(r in RUNTIMES for r in self.runtimes):
            problems.append(f"bad --runtime {self.runtime!r}: {' or '.join(RUNTIMES)}, or a comma-separated list of them")
        try:
            PartitionSpec.parse(self.partition)
        except ValueError as exc:
            problems.append(str(exc))
        if problems:
            raise ValueError("; ".join(problems))

    def settings(self) -> Iterator[tuple[str, Any, Setting]]:
        return values_of(self)

    @property
    def runtimes(self) -> list[str]:
        return self.runtime.split(",")

    def runtime_of(self, index: int) -> str:
        """The runtime of device ``index`` of the population."""
        return self.runtimes[index % len(self.runtimes)]


def device_settings() -> Iterator[tuple[str, type, Setting, Any]]:
    """Each setting's name, type, declaration and default, in declaration order."""
    return declared(DeviceSettings)


def flag_of(name: str) -> str:
    """The command-line flag of a setting, with its dashes."""
    return flag_for(DeviceSettings, name)


def dest_of(name: str) -> str:
    """Where argparse puts a setting's value: named by its flag (``--data-seed``: ``data_seed``)."""
    return flag_of(name)[2:].replace("-", "_")


def command_line(settings: DeviceSettings) -> list[str]:
    """The flags that give ``settings`` to a device host (or to ``edgefl devices``)."""
    return [arg for name, value, _ in settings.settings() for arg in (flag_of(name), str(value))]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per setting, its value checked when ``from_arguments`` builds the settings."""
    for name, kind, rule, default in device_settings():
        parser.add_argument(flag_of(name), dest=dest_of(name), type=kind, default=default, help=rule.help)


def from_arguments(args: argparse.Namespace, **overrides: Any) -> DeviceSettings:
    """The settings an argument parser read (with ``add_arguments``, or the ``edgefl
    devices`` flags), less ``overrides``; a ValueError says what does not fit."""
    given = {name: getattr(args, dest_of(name)) for name, *_ in device_settings()}
    return DeviceSettings(**{**given, **overrides})
