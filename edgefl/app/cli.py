"""The ``edgefl`` command: serve, devices, export, status, demo.

Each subcommand imports its room (coordinator, device_sim, export) only when run, so
``edgefl --help`` and a mistyped flag answer at once. Every failure a user can cause
ends in one line on stderr and a non-zero exit: flags are checked as they are parsed
(numbers against their ranges, URLs for their scheme), and the usual mistakes later
(unreachable coordinators, unwritable paths, missing files) are caught here and named
by the flag the user typed.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import sys
from importlib import metadata
from pathlib import Path
from urllib.parse import urlparse

DEFAULT_URL = "http://127.0.0.1:8080"


class CliError(Exception):
    """A user-facing failure: printed as one line, exit status 1."""


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

    group = parser.add_argument_group("run configuration (for a new run; a resumed run keeps its own)")
    for name, default, rule in RunConfig(**(defaults or {})).settings():
        kind = type(default)
        if rule.choices:
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


def given_settings(args: argparse.Namespace) -> dict:
    """The run-configuration fields the user set on the command line."""
    from edgefl.config import RunConfig

    return {name: getattr(args, name) for name, _, _ in RunConfig().settings() if getattr(args, name, None) is not None}


def run_config_from(args: argparse.Namespace, defaults: dict | None = None):
    from edgefl.config import ConfigError, RunConfig, flag_of

    try:
        return RunConfig(**{**(defaults or {}), **given_settings(args)})
    except ConfigError as error:
        raise CliError(error.describe(flag_of)) from None


def _read_secret(path: Path | None, flag: str) -> str | None:
    if path is None:
        return None
    try:
        secret = path.read_text().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise CliError(f"cannot read {flag} {path}: {getattr(exc, 'strerror', None) or exc}") from None
    if len(secret) < 16:
        raise CliError(f"{flag} {path} must hold a secret of at least 16 characters")
    return secret


def _add_fleet_args(parser: argparse.ArgumentParser, *, count_default: int) -> None:
    parser.add_argument(
        "--count",
        type=bounded(int, 1, 10_000),
        default=count_default,
        help=f"device processes to start (default {count_default})",
    )
    parser.add_argument("--partition", default="dirichlet:0.5", help="iid, dirichlet:ALPHA or classes:K (default dirichlet:0.5)")
    parser.add_argument("--data-seed", type=bounded(int, 0, 2**32 - 1), default=0, help="seed of the partition (default 0)")
    parser.add_argument(
        "--runtime",
        default="keras",
        help="what devices train with: keras, litert (the on-device .tflite through LiteRT, no TensorFlow), or a"
        " comma-separated list cycled over the devices, e.g. keras,litert (default keras)",
    )
    parser.add_argument(
        "--holdout",
        type=bounded(float, 0, 1, below_high=True),
        default=0.2,
        help="fraction of each device's examples kept out of training to report global vs personalised accuracy"
        " (default 0.2; 0: no reports)",
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
        help="WSGI threads per worker process (default 16); all but 4 may hold check-ins until the next round opens",
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

    devices = command("devices", "start simulated devices, one OS process each")
    devices.add_argument(
        "--coordinator", type=coordinator_url, default=DEFAULT_URL, help=f"coordinator URL (default {DEFAULT_URL})"
    )
    _add_fleet_args(devices, count_default=10)
    devices.add_argument(
        "--num-devices", type=bounded(int, 1, 10_000_000), help="size of the population the data is split over (default: --count)"
    )
    devices.add_argument(
        "--first-index",
        type=bounded(int, 0, 10_000_000),
        default=0,
        help="index of the first device in that population (default 0)",
    )
    devices.add_argument("--dataset", default="digits", help="dataset the devices' shards come from (default digits)")
    devices.add_argument("--log-dir", type=Path, default=Path("runs/devices"), help="per-device logs (default runs/devices)")
    devices.add_argument(
        "--threads", type=bounded(int, 1, 256), default=1, help="TensorFlow threads per device process (default 1)"
    )
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
    export.add_argument("--model", default="cnn", help="model of --checkpoint (default cnn)")
    export.add_argument("--dataset", default="digits", help="held-out data to check and calibrate on (default digits)")
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
    _add_fleet_args(demo, count_default=10)
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


def main(argv: list[str] | None = None) -> int:
    from edgefl import logs

    args = parse(argv)
    logs.configure(args.log_level)
    from edgefl.client import CoordinatorUnreachable, ProtocolError

    try:
        return _COMMANDS[args.command](args) or 0
    except CliError as exc:
        print(f"edgefl {args.command}: error: {exc}", file=sys.stderr)
    except CoordinatorUnreachable as exc:
        print(f"edgefl {args.command}: error: coordinator unreachable: {exc}", file=sys.stderr)
    except ProtocolError as exc:
        print(f"edgefl {args.command}: error: the coordinator refused: {exc}", file=sys.stderr)
    except KeyboardInterrupt:
        print(f"edgefl {args.command}: interrupted; everything it started has been stopped", file=sys.stderr)
        return 130
    return 1


def _serve(args) -> int:
    from coordinator.database import DatabaseError
    from coordinator.server import serve
    from edgefl.app.launcher import edgefl_command

    config = run_config_from(args)
    if args.from_final and not args.new_run:
        raise CliError("--from-final starts a new run from the last one's model: give --new-run too")
    admin_token = _read_secret(args.admin_token_file, "--admin-token-file")
    enrolment_secret = _read_secret(args.enrolment_secret_file, "--enrolment-secret-file")
    try:
        serve(
            instance=args.instance,
            config=config,
            given=set(given_settings(args)),
            host=args.host,
            port=args.port,
            threads=args.threads,
            workers=args.workers,
            db_url=args.db,
            admin_token=admin_token,
            enrolment_secret=enrolment_secret,
            max_devices=args.max_devices,
            new_run=args.new_run,
            from_final=args.from_final,
            publish_command=None if args.no_publish else edgefl_command("export"),
        )
    except (ValueError, RuntimeError, sqlite3.DatabaseError, DatabaseError) as exc:
        raise CliError(str(exc)) from None
    except OSError as exc:
        raise CliError(f"cannot serve on {args.host}:{args.port} with instance {args.instance}: {exc.strerror or exc}") from None
    return 0


def _devices(args) -> int:
    from device_sim.device import DeviceSpec
    from device_sim.fleet import run_fleet
    from edgefl.datasets import load_dataset
    from edgefl.partition import partition

    num_devices = args.num_devices or args.count
    runtimes = device_runtimes(args.runtime)
    if args.first_index + args.count > num_devices:
        raise CliError(
            f"devices {args.first_index}..{args.first_index + args.count - 1} do not fit a population of {num_devices} (--num-devices)"
        )
    try:
        # What every device will compute, computed once here so a bad spec fails in one line.
        partition(load_dataset(args.dataset).train.y, args.partition, num_devices, args.data_seed)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    secret = _read_secret(args.enrolment_secret_file, "--enrolment-secret-file")
    _check_reachable(args.coordinator)
    specs = [
        DeviceSpec(
            coordinator=args.coordinator,
            index=i,
            num_devices=num_devices,
            dataset=args.dataset,
            partition=args.partition,
            seed=args.data_seed,
            threads=args.threads,
            runtime=runtimes[i % len(runtimes)],
            holdout=args.holdout,
        )
        for i in range(args.first_index, args.first_index + args.count)
    ]
    return run_fleet(specs, args.log_dir, enrolment_secret=secret)


def device_runtimes(flag: str) -> list[str]:
    from device_sim.device import RUNTIMES

    runtimes = flag.split(",")
    if not all(r in RUNTIMES for r in runtimes):
        raise CliError(f"bad --runtime {flag!r}: {' or '.join(RUNTIMES)}, or a comma-separated list of them")
    return runtimes


def _check_reachable(url: str) -> dict:
    from edgefl.client import CoordinatorClient

    return CoordinatorClient(url, give_up_after_s=5).status()


def writable_directory(path: Path, flag: str) -> Path:
    """``path`` as a directory this process can write into (created if need be), or a
    one-line error naming ``flag``."""
    if path.exists() and not path.is_dir():
        raise CliError(f"{flag} {path} exists and is not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".edgefl-write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise CliError(f"cannot write into {flag} {path}: {exc.strerror or exc}") from None
    return path


def _export(args) -> int:
    import hashlib

    from edgefl import wire
    from edgefl.client import CoordinatorClient
    from edgefl.datasets import DATASET_NAMES
    from edgefl.models import MODEL_NAMES, model_spec

    if args.dataset not in DATASET_NAMES:
        raise CliError(f"unknown --dataset {args.dataset!r}; choose one of {', '.join(DATASET_NAMES)}")
    variants = [v for v in args.variants.split(",") if v]
    known = ("float32", "float16", "dynamic", "int8")
    if not variants or set(variants) - set(known):
        raise CliError(f"bad --variants {args.variants!r}: a comma-separated choice of {', '.join(known)}")
    train_batch = args.train_batch
    if args.checkpoint is not None:
        if args.model not in MODEL_NAMES:
            raise CliError(f"unknown --model {args.model!r}; choose one of {', '.join(MODEL_NAMES)}")
        if not args.checkpoint.is_file():
            raise CliError(f"no checkpoint file at {args.checkpoint}")
        writable_directory(args.out, "--out")
        data = args.checkpoint.read_bytes()
        model, round_number = args.model, args.round
        train_batch = 10 if train_batch is None else train_batch
    else:
        writable_directory(args.out, "--out")
        client = CoordinatorClient(args.coordinator, give_up_after_s=5)
        status = client.status()
        if not status.get("run"):
            raise CliError(f"the coordinator at {args.coordinator} has no checkpoint yet")
        model, round_number = status["run"]["config"]["model"], status["model"]["version"]
        train_batch = status["run"]["config"]["batch_size"] if train_batch is None else train_batch
        data = client.download_checkpoint(status["model"]["sha256"])
    try:
        weights, metadata = wire.decode(data, model_spec(model))
    except wire.WireError as exc:
        raise CliError(f"the checkpoint does not fit model {model}: {exc.detail}") from None
    if round_number is None and metadata.get("version", "").isdigit():
        round_number = int(metadata["version"])
    from edgefl.app.report import export_table
    from edgefl.logs import native_stderr_silenced
    from export import MODEL_CARD, export_checkpoint

    try:
        with native_stderr_silenced():  # the TFLite converter's and LiteRT's native chatter
            card = export_checkpoint(
                weights=weights,
                model_name=model,
                dataset=args.dataset,
                out_dir=args.out,
                checkpoint_sha256=hashlib.sha256(data).hexdigest(),
                round_number=round_number,
                variants=variants,
                train_batch=train_batch or None,
            )
    except OSError as exc:
        raise CliError(f"cannot write the files into --out {args.out}: {exc.strerror or exc}") from None
    print(export_table(card, args.out))
    print(f"model card: {args.out / MODEL_CARD}")
    return 0


def _status(args) -> int:
    from edgefl.app.report import format_status
    from edgefl.client import CoordinatorClient

    status = CoordinatorClient(args.coordinator, give_up_after_s=5).status()
    print(json.dumps(status, indent=2) if args.json else format_status(status))
    return 0


def _demo(args) -> int:
    from edgefl.app.demo import run_demo

    config = run_config_from(args, DEMO_DEFAULTS)
    device_runtimes(args.runtime)
    return run_demo(args, config)


_COMMANDS = {"serve": _serve, "devices": _devices, "export": _export, "status": _status, "demo": _demo}

if __name__ == "__main__":
    sys.exit(main())
