"""Run configuration: what a federated run trains, and how rounds are paced.

One frozen dataclass, stored as JSON with the run so that a restarted coordinator
resumes with exactly the configuration it started with. Each setting is declared
once, with its help text, its command-line flag, the values it accepts and whether
an operator may change it mid-run: the CLI's flags, the API's bodies
(``edgefl.protocol``), the configuration file, ``EDGEFL_*`` environment variables, the
launcher's command lines and the validation of every value are derived from these
declarations, and a problem is reported by the name its reader knows
(``--round-timeout`` on the command line, ``round_timeout_s`` in the API and the file,
``EDGEFL_ROUND_TIMEOUT_S`` in the environment).

Sources, weakest first: the defaults, a TOML file (``[run]`` table, as Flower's
``[tool.flwr.app.config]``; read by the standard library's ``tomllib``), the
environment, the command line.
"""

from __future__ import annotations

import json
import math
import tomllib
import typing
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field, fields
from functools import lru_cache
from pathlib import Path
from typing import Any

from edgefl.codecs import FLOAT32, Codec
from edgefl.compression import BITS
from edgefl.datasets import dataset_problem
from edgefl.models import REFERENCE_HELP, model_problem
from edgefl.secagg import graph as secagg_graph

SERVER_OPTIMIZERS = ("sgd", "sgdm", "adam")  # FedAvg, FedAvgM, FedAdam
AGGREGATORS = (
    "mean",
    "robust",
    "dp_adaptive",
    "dp_fixed",
    "compressed",
    "secure",
)  # their TFF factories: coordinator.aggregation
# An aggregator with a device half names its codec here; the others take float32 updates.
DEVICE_CODECS: dict[str, Callable[[RunConfig], Codec]] = {"compressed": lambda config: Codec(config.compression_bits)}


@dataclass(frozen=True)
class Setting:
    """What a configuration field accepts, and how people name it."""

    help: str
    flag: str = ""  # the command line's name, without "--"; default: the field's name with "-"
    low: float | None = None
    high: float | None = None
    above_low: bool = False  # low itself is not allowed
    below_high: bool = False  # high itself is not allowed
    choices: tuple = ()
    check: Callable[[Any], str | None] | None = None  # what the declaration cannot say (a reference's syntax)
    mutable: bool = False  # POST /v1/admin/config may change it mid-run

    def problem(self, value: Any) -> str | None:
        """Why ``value`` is not acceptable ("must be ..."), or None."""
        if self.check:
            return self.check(value)
        if self.choices:
            return None if value in self.choices else f"must be one of {', '.join(map(str, self.choices))}"
        if isinstance(value, float) and not math.isfinite(value):
            return "must be a finite number"
        too_low = self.low is not None and (value <= self.low if self.above_low else value < self.low)
        too_high = self.high is not None and (value >= self.high if self.below_high else value > self.high)
        if not (too_low or too_high):
            return None
        lower = f"{'above' if self.above_low else 'at least'} {self.low:g}" if self.low is not None else ""
        upper = f"{'below' if self.below_high else 'at most'} {self.high:g}" if self.high is not None else ""
        return "must be " + " and ".join(filter(None, (lower, upper)))


def setting(default: Any, help: str, **accepts: Any) -> Any:
    """A dataclass field declared as a setting (``RunConfig``'s, ``device_sim.settings``')."""
    return field(default=default, metadata={"setting": Setting(help=help, **accepts)})


def declared(cls: type) -> Iterator[tuple[str, type, Setting, Any]]:
    """Each setting a dataclass declares: its name, type, declaration and default, in order."""
    types = typing.get_type_hints(cls)
    for f in fields(cls):
        yield f.name, types[f.name], f.metadata["setting"], f.default


def values_of(settings: Any) -> Iterator[tuple[str, Any, Setting]]:
    """Each setting of a dataclass instance: its name, value and declaration."""
    for f in fields(settings):
        yield f.name, getattr(settings, f.name), f.metadata["setting"]


def flag_for(cls: type, name: str) -> str:
    """The command-line flag of a declared setting, with its dashes."""
    flag = next(s.flag for n, _, s, _ in declared(cls) if n == name)
    return "--" + (flag or name.replace("_", "-"))


class ConfigError(ValueError):
    """Settings that do not fit; ``problems`` are (field, "must be ...") pairs, whose
    text names other fields as ``{field}``, so each reader can name fields its own way
    (``describe``)."""

    def __init__(self, problems: list[tuple[str, str]]):
        self.problems = problems
        super().__init__(self.describe(lambda name: name))

    def describe(self, name_of: Callable[[str], str]) -> str:
        names = {f.name: name_of(f.name) for f in fields(RunConfig)}
        return "; ".join(f"{name_of(name)} {text.format_map(names)}" for name, text in self.problems)


def _literal(text: str) -> str:
    """A problem's text with its braces kept (a path's, say): ConfigError reads ``{name}`` as a field."""
    return text.replace("{", "{{").replace("}", "}}")


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    model: str = setting("cnn", f"model to train: {REFERENCE_HELP}", check=model_problem)
    dataset: str = setting(
        "digits", "dataset whose test split the coordinator holds (see README: Your own data)", check=dataset_problem
    )
    rounds: int = setting(10, "rounds to run", low=1, high=1_000_000, mutable=True)
    target_reports: int = setting(10, "updates that close a round", low=1, high=1_000_000, mutable=True)
    min_reports: int = setting(8, "updates a round needs by its deadline", low=1, high=1_000_000, mutable=True)
    over_selection: float = setting(1.3, "cohort = target reports x this", low=1.0, high=100.0, mutable=True)
    round_timeout_s: float = setting(
        120.0, "seconds before a round's deadline", flag="round-timeout", low=0, high=7 * 86400, above_low=True, mutable=True
    )
    epochs: int = setting(1, "local epochs per round", low=1, high=1000, mutable=True)
    batch_size: int = setting(10, "local batch size", low=1, high=100_000, mutable=True)
    client_lr: float = setting(0.05, "device SGD learning rate", low=0, high=1000, above_low=True, mutable=True)
    client_momentum: float = setting(0.0, "device SGD momentum (0: plain SGD)", low=0, high=1, below_high=True, mutable=True)
    client_prox_mu: float = setting(
        0.0, "FedProx's proximal strength mu on the devices (0: FedAvg's local SGD)", low=0, high=1000, mutable=True
    )
    aggregator: str = setting(
        "mean",
        "mean, robust (adaptive zeroing and clipping), dp_adaptive or dp_fixed (central DP), or compressed"
        " (devices upload quantized updates), or secure (SecAgg+: the coordinator learns only the sum)",
        choices=AGGREGATORS,
    )
    server_optimizer: str = setting("sgd", "sgd (FedAvg), sgdm (FedAvgM) or adam (FedAdam)", choices=SERVER_OPTIMIZERS)
    server_lr: float = setting(1.0, "server optimizer's learning rate (1.0 with sgd: FedAvg)", low=0, high=1000, above_low=True)
    server_momentum: float = setting(0.9, "sgdm's momentum", low=0, high=1, below_high=True)
    dp_noise_multiplier: float = setting(1.0, "DP noise stddev over the clip norm (dp_* only)", low=0, high=1000)
    dp_clip: float = setting(0.1, "dp_fixed's L2 clip norm per update", low=0, high=1e6, above_low=True)
    compression_bits: int = setting(8, "compressed's bits per uploaded value", choices=BITS)
    secure_value_bound: float = setting(
        1000.0, "secure's clip range per entry of an update times its examples (+-this)", low=0, high=1e9, above_low=True
    )
    secure_weight_bound: float = setting(
        100_000.0, "secure's largest example count one device's update is weighted by", low=0, high=1e9, above_low=True
    )
    secagg_degree: int = setting(0, "secure's neighbours per device (0: 2 ceil(3 log2 n), at most n - 1)", low=0, high=10_000)
    secagg_threshold: int = setting(
        0, "secure's shares that recover a device's secrets (0: a majority of its neighbours)", low=0, high=10_000
    )
    secagg_phase_timeout_s: float = setting(
        30.0,
        "secure's seconds for each phase after the keys are advertised",
        flag="secagg-phase-timeout",
        low=0,
        high=86400,
        above_low=True,
        mutable=True,
    )
    seed: int = setting(0, "seed of the initial model", low=0, high=2**32 - 1)

    def __post_init__(self) -> None:
        problems = [(name, _literal(problem)) for name, value, s in self.settings() if (problem := s.problem(value))]
        if problems:
            raise ConfigError(problems)
        if self.min_reports > self.target_reports:
            problems.append(("min_reports", "must not exceed {target_reports}"))
        if self.aggregator == "dp_adaptive" and self.dp_noise_multiplier >= 0.1 * self.target_reports:
            # TFF's adaptive clipping spends part of the noise on its clip estimate, whose
            # noise is 0.05 x the clients per round: it must stay above half the total.
            problems.append(("target_reports", "must be above 10 x {dp_noise_multiplier} for dp_adaptive"))
        if self.aggregator == "secure":
            problems += self._secure_problems()
        if problems:
            raise ConfigError(problems)

    def _secure_problems(self) -> list[tuple[str, str]]:
        """SecAgg+ needs a neighbour graph in every round that may go ahead: one of
        ``min_reports`` devices must already give each device ``secagg_threshold``
        neighbours (the degree never shrinks as devices are added)."""
        if self.min_reports < 2:
            return [("min_reports", "must be at least 2 for secure")]
        if self.secagg_degree % 2:
            return [("secagg_degree", "must be even (0: the default)")]
        try:
            secagg_graph.round_shape(self.min_reports, self.secagg_degree, self.secagg_threshold)
        except ValueError:
            return [("secagg_threshold", "must not exceed the neighbours {min_reports} devices give each other")]
        return []

    def settings(self) -> Iterator[tuple[str, Any, Setting]]:
        return values_of(self)

    @property
    def upload_codec(self) -> Codec:
        """How devices encode their updates for this run's aggregator."""
        codec = DEVICE_CODECS.get(self.aggregator)
        return codec(self) if codec else FLOAT32

    @property
    def cohort_size(self) -> int:
        return math.ceil(self.target_reports * self.over_selection)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> RunConfig:
        """The configuration stored as ``text``. Cached by the text: the store's copy is
        read on every check-in and driver step, and its references (a dataset's files,
        a model's) are checked once, not at each read (nor fail each read if the files
        go away mid-run)."""
        return _config_from_json(text)


@lru_cache(maxsize=64)
def _config_from_json(text: str) -> RunConfig:
    known = {f.name for f in fields(RunConfig)}
    return RunConfig(**{k: v for k, v in json.loads(text).items() if k in known})


def run_settings() -> Iterator[tuple[str, type, Setting]]:
    """Each RunConfig field's name, type and declaration, in order: what the CLI's
    flags, the configuration file and the API's bodies are derived from."""
    for name, kind, declaration, _ in declared(RunConfig):
        yield name, kind, declaration


def flag_of(name: str) -> str:
    """The command-line flag of a RunConfig field, with its dashes."""
    return flag_for(RunConfig, name)


def command_line(config: RunConfig) -> list[str]:
    """The flags that give ``config`` to ``edgefl serve`` (or ``demo``)."""
    return [arg for name, value, _ in config.settings() for arg in (flag_of(name), str(value))]


ENV_PREFIX = "EDGEFL_"


def env_name(name: str) -> str:
    """The environment variable of a RunConfig field."""
    return ENV_PREFIX + name.upper()


def _checked(name: str, value: Any, where: str) -> Any:
    """``value`` for field ``name`` if it has the field's type (ints for floats too), or
    a ValueError naming ``where`` it came from."""
    types = {n: t for n, t, _ in run_settings()}
    if name not in types:
        raise ValueError(f"{where}: there is no setting {name!r} (settings: {', '.join(types)})")
    kind = types[name]
    fits = isinstance(value, kind) and not isinstance(value, bool)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value, fits = float(value), True
    if not fits:
        wanted = {int: "a whole number", float: "a number", str: "a string"}[kind]
        raise ValueError(f"{where} must be {wanted}, not {value!r}")
    return value


def settings_from_file(path: Path) -> dict[str, Any]:
    """The run settings a TOML file gives: in a ``[run]`` table, or at its top level."""
    try:
        document = tomllib.loads(Path(path).read_text())
    except OSError as error:
        raise ValueError(f"cannot read {path}: {error.strerror or error}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not TOML: {error}") from None
    table = document.get("run", document)
    if table is not document and set(document) != {"run"}:
        raise ValueError(f"{path}: only a [run] table is read, not {', '.join(sorted(set(document) - {'run'}))}")
    if not isinstance(table, dict):
        raise ValueError(f"{path}: [run] must be a table of settings")
    return {name: _checked(name, value, f"{name} in {path}") for name, value in table.items()}


def settings_from_env(environ: Mapping[str, str]) -> dict[str, Any]:
    """The run settings ``EDGEFL_<FIELD>`` variables give (others are left alone)."""
    given = {}
    for name, kind, _ in run_settings():
        text = environ.get(env_name(name))
        if text is None:
            continue
        try:
            value = kind(text.strip())
        except ValueError:
            value = text
        given[name] = _checked(name, value, env_name(name))
    return given
