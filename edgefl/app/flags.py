"""The ``edgefl`` command's flags, declared in one place: each is checked as it is parsed
(numbers against their ranges, URLs for their scheme), so a mistake is one line and exit
status 2 before anything starts. The run settings' flags come from ``edgefl.config``'s
declarations, the devices' from ``device_sim.settings``'.
"""

from __future__ import annotations

import argparse
from importlib import metadata
from pathlib import Path
from urllib.parse import urlparse

from coordinator import DEFAULT_CHECKIN_RATE, DEFAULT_LOBBY
from device_sim.settings import DEFAULT_COORDINATOR

DEFAULT_URL = DEFAULT_COORDINATOR


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def bounded(
    kind: type, low: float | None = None, high: float | None = None, *, above_low: bool = False, below_high: bool = False
):
    """An argparse type: a number of ``kind`` within the bounds."""
    from edgefl.config import Setting

    rule = Setting(help="", low=low, high=high, above_low=above_low, below_high=below_high)

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'a whole number' if kind is int else 'a number'}") from None
        problem = rule.problem(value)
        if problem:
            raise argparse.ArgumentTypeError(f"{text}: {problem}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    parse.rule, parse.kind = rule, kind
    return parse


def coordinator_url(text: str) -> str:
    """An argparse type: an http(s) URL with a host."""
    parsed = urlparse(text)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise argparse.ArgumentTypeError(f"{text!r} is not a URL like {DEFAULT_URL}")
    try:
        parsed.port  # noqa: B018 - raises for a port out of range
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} has a port out of range") from None
    return text.rstrip("/")


# The demo's own defaults: with 20% of each shard held out for personalisation reports,
# one local epoch ended at 0.88; two end at 0.95-0.96 over seeds (README, "Two commands").
DEMO_DEFAULTS = {"epochs": 2}


def _add_run_config(parser: argparse.ArgumentParser, defaults: dict | None = None) -> None:
    """One flag per RunConfig setting (``edgefl.config`` declares them). They default to
    None so that ``serve`` knows which ones a user gave: a restarted coordinator resumes
    its stored configuration, and only given flags must agree with it."""
    from edgefl.config import RunConfig, flag_of

    group = parser.add_argument_group(
        "run configuration (for a new run; a resumed run keeps its own). Also from --config FILE.toml ([run] table,"
        " the fields named as in the API, e.g. round_timeout_s = 60) and EDGEFL_<FIELD> variables (EDGEFL_ROUNDS=20);"
        " flags win over variables, variables over the file"
    )
    group.add_argument("--config", type=Path, metavar="FILE.toml", help="run settings from a TOML file")
    for name, default, rule in RunConfig(**(defaults or {})).settings():
        kind = type(default)
        if rule.choices or kind is str:  # a string's value is checked when the configuration is built
            value_type = kind
        else:
            value_type = bounded(kind, rule.low, rule.high, above_low=rule.above_low, below_high=rule.below_high)
        group.add_argument(
            flag_of(name),
            dest=name,
            type=value_type,
            choices=rule.choices or None,
            metavar=name.upper() if not rule.choices else None,
            help=f"{rule.help} (default {default})",
        )


# What the demo lets a user choose of its devices; ``edgefl devices`` takes every device setting.
DEMO_DEVICE_SETTINGS = ("partition", "seed", "runtime", "holdout")


def _add_fleet_args(parser: argparse.ArgumentParser, *, count_default: int, settings: tuple[str, ...] | None = None) -> None:
    """``--count`` and the flags of the device settings named (all by default), derived
    from their declarations in ``device_sim.settings``."""
    from device_sim.settings import device_settings, flag_of

    parser.add_argument(
        "--count", type=bounded(int, 1, 10_000), default=count_default, help=f"devices to start (default {count_default})"
    )
    # num_devices defaults to --count; dataset to the run's (the coordinator's status says it)
    special = {"coordinator": (coordinator_url, DEFAULT_URL), "num_devices": (None, None), "dataset": (str, None)}
    unset = {"num_devices": "--count", "dataset": "the run's"}
    for name, kind, rule, default in device_settings():
        if settings is not None and name not in settings:
            continue
        value_type, default = special.get(name, (None, default))
        if value_type is None:
            numeric = kind in (int, float) and not rule.choices
            value_type = (
                bounded(kind, rule.low, rule.high, above_low=rule.above_low, below_high=rule.below_high) if numeric else kind
            )
        parser.add_argument(
            flag_of(name),
            type=value_type,
            choices=rule.choices or None,
            default=default,
            help=f"{rule.help} (default {unset[name] if default is None else default})",
        )


def _version() -> str:
    try:
        return metadata.version("edgefl")
    except metadata.PackageNotFoundError:
        return "unknown"


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    from edgefl.logs import LEVELS

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--log-level",
        choices=LEVELS,
        default="info",
        help="info (default): edgefl's own lines only; debug: also TensorFlow's, TFF's, LiteRT's and the WSGI server's",
    )
    parser = _Parser(prog="edgefl", description="Federated learning with real devices, TFF averaging and TFLite export.")
    parser.add_argument("--version", action="version", version=f"edgefl {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    commands = {}

    def command(name: str, help: str) -> argparse.ArgumentParser:
        commands[name] = sub.add_parser(name, help=help, parents=[common])
        return commands[name]

    serve = command("serve", "run the coordinator (WSGI server + round driver)")
    serve.add_argument(
        "--instance",
        type=Path,
        default=Path("runs/coordinator"),
        help="directory of the database and blobs (default runs/coordinator)",
    )
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    serve.add_argument("--port", type=bounded(int, 0, 65535), default=8080, help="port, 0 for any free one (default 8080)")
    serve.add_argument(
        "--admin-token-file",
        type=Path,
        help="file holding the admin token for /v1/admin/{pause,resume,stop,config}; without it those are off",
    )
    serve.add_argument(
        "--enrolment-secret-file",
        type=Path,
        help="file holding a secret devices must send to register (edgefl devices --enrolment-secret-file);"
        " without it anyone may register, at a bounded rate",
    )
    serve.add_argument(
        "--max-devices", type=bounded(int, 1, 10_000_000), default=100_000, help="most devices that may register (default 100000)"
    )
    serve.add_argument(
        "--threads",
        type=bounded(int, 1, 1024),
        default=16,
        help="WSGI threads per worker process that serve requests other than held check-ins (default 16)",
    )
    serve.add_argument(
        "--lobby",
        type=bounded(int, 0, 4096),
        default=DEFAULT_LOBBY,
        help=f"check-ins a worker process may hold until the next round opens, each on a thread of its own; the next"
        f" round's cohort is chosen from them (default {DEFAULT_LOBBY})",
    )
    serve.add_argument(
        "--checkin-rate",
        type=bounded(float, 0.1, 1e6),
        default=DEFAULT_CHECKIN_RATE,
        help=f"pace steering: devices not held are told to come back so that they check in at about this many per"
        f" second in all (default {DEFAULT_CHECKIN_RATE:g})",
    )
    serve.add_argument(
        "--workers", type=bounded(int, 1, 64), default=1, help="WSGI worker processes sharing the store (default 1)"
    )
    serve.add_argument(
        "--no-publish",
        action="store_true",
        help="do not build the phone artefacts (/v1/models/...) when a round commits",
    )
    serve.add_argument(
        "--db", help="database URL: sqlite:///PATH or postgresql://USER@HOST/DB (default: SQLite in the instance directory)"
    )
    serve.add_argument(
        "--new-run",
        action="store_true",
        help="the instance holds a finished or stopped run: keep its record (in INSTANCE/previous-runs/) and start a new run",
    )
    serve.add_argument(
        "--from-final",
        action="store_true",
        help="with --new-run: start the new run from the previous run's final model instead of fresh weights",
    )
    _add_run_config(serve)

    devices = command("devices", "start simulated devices, one OS process each unless --per-process says otherwise")
    _add_fleet_args(devices, count_default=10)
    devices.add_argument(
        "--per-process",
        type=bounded(int, 1, 10_000),
        default=1,
        help="devices per OS process (a device host sharing one dataset load, its learners and a scheduler; default 1)",
    )
    devices.add_argument(
        "--first-index",
        type=bounded(int, 0, 10_000_000),
        default=0,
        help="index of the first device in the population (default 0)",
    )
    devices.add_argument(
        "--wait-for-coordinator",
        type=bounded(float, 0, 86_400),
        default=5.0,
        metavar="SECONDS",
        help="how long to wait for the coordinator to answer before giving up (default 5); meanwhile the device"
        " hosts import their runtime and load their data when --dataset is given",
    )
    devices.add_argument("--log-dir", type=Path, default=Path("runs/devices"), help="per-device logs (default runs/devices)")
    devices.add_argument(
        "--enrolment-secret-file", type=Path, help="file holding the coordinator's enrolment secret, if it has one"
    )

    export = command("export", "convert the newest global model to .tflite files and a model card")
    source = export.add_mutually_exclusive_group()
    source.add_argument(
        "--coordinator",
        type=coordinator_url,
        default=DEFAULT_URL,
        help=f"take the newest checkpoint from this coordinator (default {DEFAULT_URL})",
    )
    source.add_argument("--checkpoint", type=Path, help="take a checkpoint file (safetensors) instead")
    export.add_argument(
        "--model",
        help="model of --checkpoint (default cnn); with --coordinator, needed when the run's model is not a built-in"
        " (file.py:fn, module:fn, .keras: building it runs its code)",
    )
    export.add_argument(
        "--dataset", help="held-out data to check and calibrate on (default: the run's, or digits for --checkpoint)"
    )
    export.add_argument("--out", type=Path, default=Path("runs/export"), help="output directory (default runs/export)")
    export.add_argument(
        "--variants",
        default="float32,float16,dynamic,int8",
        help="inference files to write, comma-separated (default float32,float16,dynamic,int8)",
    )
    export.add_argument(
        "--train-batch",
        type=bounded(int, 0, 100_000),
        help="fixed batch of the on-device training file (default: the run's batch size, or 10 for --checkpoint; 0: no training file)",
    )
    export.add_argument("--round", type=bounded(int, 0, 1_000_000), help="round the --checkpoint comes from, for the model card")

    status = command("status", "show a coordinator's run and its metric history")
    status.add_argument(
        "--coordinator", type=coordinator_url, default=DEFAULT_URL, help=f"coordinator URL (default {DEFAULT_URL})"
    )
    status.add_argument("--json", action="store_true", help="print the raw JSON status")

    demo = command("demo", "a whole run: coordinator, devices, rounds, export, report")
    demo.add_argument(
        "--out", type=Path, default=Path("runs/demo"), help="directory for everything the demo writes (default runs/demo)"
    )
    _add_fleet_args(demo, count_default=10, settings=DEMO_DEVICE_SETTINGS)
    _add_run_config(demo, DEMO_DEFAULTS)
    return parser, commands


def parse(argv: list[str] | None) -> argparse.Namespace:
    """Parse, reporting a stray argument as its subcommand's error (argparse would
    blame ``edgefl`` itself)."""
    parser, commands = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        commands[args.command].error(f"unrecognized arguments: {' '.join(extra)}")
    return args
