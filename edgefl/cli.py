"""The ``edgefl`` command: serve, devices, export, status, demo.

Each subcommand imports its room (coordinator, device_sim, export) only when run, so
``edgefl --help`` and a mistyped flag answer at once. Every failure a user can cause
ends in one line on stderr and a non-zero exit: the usual mistakes (flags, values,
URLs, unreachable coordinators, missing files) are checked or caught here.
"""
from __future__ import annotations

import argparse
import json
import os
import sqlite3
import sys
from pathlib import Path

DEFAULT_URL = "http://127.0.0.1:8080"


class CliError(Exception):
    """A user-facing failure: printed as one line, exit status 1."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


# Run-configuration flags and the RunConfig fields they set.
_RUN_FLAGS = {
    "model": "model", "dataset": "dataset", "rounds": "rounds", "target_reports": "target_reports",
    "min_reports": "min_reports", "over_selection": "over_selection", "round_timeout": "round_timeout_s",
    "epochs": "epochs", "batch_size": "batch_size", "client_lr": "client_lr", "server_lr": "server_lr", "seed": "seed",
    "aggregator": "aggregator", "server_optimizer": "server_optimizer", "server_momentum": "server_momentum",
    "dp_noise_multiplier": "dp_noise_multiplier", "dp_clip": "dp_clip", "compression_bits": "compression_bits",
}


def _add_run_config(parser: argparse.ArgumentParser) -> None:
    """The flags default to None so that ``serve`` knows which ones a user gave: a
    restarted coordinator resumes its stored configuration, and only given flags must
    agree with it."""
    from edgefl.config import RunConfig

    d = RunConfig()
    g = parser.add_argument_group("run configuration (for a new run; a resumed run keeps its own)")
    g.add_argument("--model", help=f"model to train (default {d.model}; also cnn_small)")
    g.add_argument("--dataset", help=f"dataset whose test split the coordinator holds (default {d.dataset})")
    g.add_argument("--rounds", type=int, help=f"rounds to run (default {d.rounds})")
    g.add_argument("--target-reports", type=int, help=f"updates that close a round (default {d.target_reports})")
    g.add_argument("--min-reports", type=int, help=f"updates a round needs by its deadline (default {d.min_reports})")
    g.add_argument("--over-selection", type=float, help=f"cohort = target x this (default {d.over_selection})")
    g.add_argument("--round-timeout", type=float, help=f"seconds before a round's deadline (default {d.round_timeout_s:g})")
    g.add_argument("--epochs", type=int, help=f"local epochs per round (default {d.epochs})")
    g.add_argument("--batch-size", type=int, help=f"local batch size (default {d.batch_size})")
    g.add_argument("--client-lr", type=float, help=f"device SGD learning rate (default {d.client_lr})")
    g.add_argument("--server-lr", type=float, help=f"server optimizer's learning rate (default {d.server_lr}: FedAvg)")
    g.add_argument("--server-optimizer", help=f"sgd (FedAvg), sgdm (FedAvgM) or adam (FedAdam) (default {d.server_optimizer})")
    g.add_argument("--server-momentum", type=float, help=f"sgdm's momentum (default {d.server_momentum})")
    g.add_argument(
        "--aggregator",
        help=f"mean, robust (adaptive zeroing and clipping), dp_adaptive or dp_fixed (central DP), or compressed"
        f" (devices upload quantized updates) (default {d.aggregator})",
    )
    g.add_argument("--dp-noise-multiplier", type=float, help=f"DP noise stddev over the clip norm (default {d.dp_noise_multiplier})")
    g.add_argument("--dp-clip", type=float, help=f"dp_fixed's L2 clip norm per update (default {d.dp_clip})")
    g.add_argument("--compression-bits", type=int, help=f"compressed's bits per uploaded value: 1, 2, 4, 8 or 16 (default {d.compression_bits})")
    g.add_argument("--seed", type=int, help=f"seed of the initial model (default {d.seed})")


def given_settings(args: argparse.Namespace) -> dict:
    """The run-configuration fields the user set on the command line."""
    return {field: getattr(args, flag) for flag, field in _RUN_FLAGS.items() if getattr(args, flag) is not None}


def run_config_from(args: argparse.Namespace):
    from edgefl.config import RunConfig

    try:
        return RunConfig(**given_settings(args))
    except ValueError as exc:
        raise CliError(str(exc)) from None


def _add_fleet_args(parser: argparse.ArgumentParser, *, count_default: int) -> None:
    parser.add_argument("--count", type=int, default=count_default, help=f"device processes to start (default {count_default})")
    parser.add_argument("--partition", default="dirichlet:0.5", help="iid, dirichlet:ALPHA or classes:K (default dirichlet:0.5)")
    parser.add_argument("--data-seed", type=int, default=0, help="seed of the partition (default 0)")
    parser.add_argument(
        "--runtime", default="keras",
        help="what devices train with: keras, litert (the on-device .tflite through LiteRT, no TensorFlow), or a"
        " comma-separated list cycled over the devices, e.g. keras,litert (default keras)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="edgefl", description="Federated learning with real devices, TFF averaging and TFLite export.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    serve = sub.add_parser("serve", help="run the coordinator (WSGI server + round driver)")
    serve.add_argument("--instance", type=Path, default=Path("runs/coordinator"), help="directory of the database and blobs (default runs/coordinator)")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8080, help="port, 0 for any free one (default 8080)")
    serve.add_argument(
        "--admin-token-file", type=Path,
        help="file holding the admin token for /v1/admin/{pause,resume,stop}; without it those are off",
    )
    serve.add_argument(
        "--threads", type=int, default=16,
        help="WSGI threads per worker process (default 16); all but 4 may hold check-ins until the next round opens",
    )
    serve.add_argument("--workers", type=int, default=1, help="WSGI worker processes sharing the store (default 1)")
    serve.add_argument(
        "--no-publish", action="store_true",
        help="do not build the phone artefacts (/v1/models/...) when a round commits",
    )
    serve.add_argument(
        "--db", help="database URL: sqlite:///PATH or postgresql://USER@HOST/DB (default: SQLite in the instance directory)"
    )
    _add_run_config(serve)

    devices = sub.add_parser("devices", help="start simulated devices, one OS process each")
    devices.add_argument("--coordinator", default=DEFAULT_URL, help=f"coordinator URL (default {DEFAULT_URL})")
    _add_fleet_args(devices, count_default=10)
    devices.add_argument("--num-devices", type=int, help="size of the population the data is split over (default: --count)")
    devices.add_argument("--first-index", type=int, default=0, help="index of the first device in that population (default 0)")
    devices.add_argument("--dataset", default="digits", help="dataset the devices' shards come from (default digits)")
    devices.add_argument("--log-dir", type=Path, default=Path("runs/devices"), help="per-device logs (default runs/devices)")
    devices.add_argument("--threads", type=int, default=1, help="TensorFlow threads per device process (default 1)")
    devices.add_argument(
        "--holdout", type=float, default=0.2,
        help="fraction of each device's examples kept out of training to report global vs personalised accuracy"
        " (default 0.2; 0: no reports)",
    )

    export = sub.add_parser("export", help="convert the newest global model to .tflite files and a model card")
    source = export.add_mutually_exclusive_group()
    source.add_argument("--coordinator", default=DEFAULT_URL, help=f"take the newest checkpoint from this coordinator (default {DEFAULT_URL})")
    source.add_argument("--checkpoint", type=Path, help="take a checkpoint file (safetensors) instead")
    export.add_argument("--model", default="cnn", help="model of --checkpoint (default cnn)")
    export.add_argument("--dataset", default="digits", help="held-out data to check and calibrate on (default digits)")
    export.add_argument("--out", type=Path, default=Path("runs/export"), help="output directory (default runs/export)")
    export.add_argument(
        "--variants", default="float32,float16,dynamic,int8",
        help="inference files to write, comma-separated (default float32,float16,dynamic,int8)",
    )
    export.add_argument(
        "--train-batch", type=int,
        help="fixed batch of the on-device training file (default: the run's batch size, or 10 for --checkpoint; 0: no training file)",
    )
    export.add_argument("--round", type=int, help="round the --checkpoint comes from, for the model card")

    status = sub.add_parser("status", help="show a coordinator's run and its metric history")
    status.add_argument("--coordinator", default=DEFAULT_URL, help=f"coordinator URL (default {DEFAULT_URL})")
    status.add_argument("--json", action="store_true", help="print the raw JSON status")

    demo = sub.add_parser("demo", help="a whole run: coordinator, devices, rounds, export, report")
    demo.add_argument("--out", type=Path, default=Path("runs/demo"), help="directory for everything the demo writes (default runs/demo)")
    _add_fleet_args(demo, count_default=10)
    _add_run_config(demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    # TF logs CUDA plugin registration "errors" at level E on CPU-only machines.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    args = build_parser().parse_args(argv)
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
        print(f"edgefl {args.command}: interrupted", file=sys.stderr)
        return 130
    return 1


def _serve(args) -> int:
    import logging

    from coordinator.database import DatabaseError
    from coordinator.server import serve
    from edgefl.launcher import edgefl_command

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    config = run_config_from(args)
    if args.workers < 1 or args.threads < 1:
        raise CliError("--workers and --threads must be at least 1")
    admin_token = None
    if args.admin_token_file is not None:
        try:
            admin_token = args.admin_token_file.read_text().strip()
        except OSError as exc:
            raise CliError(f"cannot read --admin-token-file {args.admin_token_file}: {exc.strerror or exc}") from None
        if len(admin_token) < 16:
            raise CliError(f"--admin-token-file {args.admin_token_file} must hold a token of at least 16 characters")
    try:
        serve(
            instance=args.instance, config=config, given=set(given_settings(args)), host=args.host, port=args.port,
            threads=args.threads, workers=args.workers, db_url=args.db, admin_token=admin_token,
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
    if args.threads < 1:
        raise CliError("--threads must be at least 1")
    runtimes = device_runtimes(args.runtime)
    if not 0 <= args.holdout < 1:
        raise CliError("--holdout must be at least 0 and below 1")
    if args.count < 1 or args.first_index < 0 or args.first_index + args.count > num_devices:
        raise CliError(f"devices {args.first_index}..{args.first_index + args.count - 1} do not fit a population of {num_devices}")
    try:
        # What every device will compute, computed once here so a bad spec fails in one line.
        partition(load_dataset(args.dataset).train.y, args.partition, num_devices, args.data_seed)
    except ValueError as exc:
        raise CliError(str(exc)) from None
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
    return run_fleet(specs, args.log_dir)


def device_runtimes(flag: str) -> list[str]:
    from device_sim.device import RUNTIMES

    runtimes = flag.split(",")
    if not all(r in RUNTIMES for r in runtimes):
        raise CliError(f"bad --runtime {flag!r}: {' or '.join(RUNTIMES)}, or a comma-separated list of them")
    return runtimes


def _check_reachable(url: str) -> dict:
    from edgefl.client import CoordinatorClient

    return CoordinatorClient(url, give_up_after_s=5).status()


def _export(args) -> int:
    from edgefl import wire
    from edgefl.client import CoordinatorClient
    from edgefl.datasets import DATASET_NAMES
    from edgefl.models import MODEL_NAMES, model_spec

    if args.dataset not in DATASET_NAMES:
        raise CliError(f"unknown dataset {args.dataset!r}; choose one of {', '.join(DATASET_NAMES)}")
    variants = [v for v in args.variants.split(",") if v]
    known = ("float32", "float16", "dynamic", "int8")
    if not variants or set(variants) - set(known):
        raise CliError(f"bad --variants {args.variants!r}: a comma-separated choice of {', '.join(known)}")
    if args.train_batch is not None and args.train_batch < 0:
        raise CliError("--train-batch must be 0 (no training file) or a batch size")
    train_batch = args.train_batch
    if args.checkpoint is not None:
        if args.model not in MODEL_NAMES:
            raise CliError(f"unknown model {args.model!r}; choose one of {', '.join(MODEL_NAMES)}")
        if not args.checkpoint.is_file():
            raise CliError(f"no checkpoint file at {args.checkpoint}")
        data = args.checkpoint.read_bytes()
        model, round_number = args.model, args.round
        train_batch = 10 if train_batch is None else train_batch
    else:
        client = CoordinatorClient(args.coordinator, give_up_after_s=5)
        status = client.status()
        if not status.get("run"):
            raise CliError(f"the coordinator at {args.coordinator} has no checkpoint yet")
        model, round_number = status["run"]["config"]["model"], status["model"]["version"]
        train_batch = status["run"]["config"]["batch_size"] if train_batch is None else train_batch
        data = client.download_checkpoint(status["model"]["sha256"])
    import hashlib

    try:
        weights, metadata = wire.decode(data, model_spec(model))
    except wire.WireError as exc:
        raise CliError(f"the checkpoint does not fit model {model}: {exc.detail}") from None
    if round_number is None and metadata.get("version", "").isdigit():
        round_number = int(metadata["version"])
    from export import MODEL_CARD, export_checkpoint

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
    from edgefl.report import export_table

    print(export_table(card, args.out))
    print(f"model card: {args.out / MODEL_CARD}")
    return 0


def _status(args) -> int:
    from edgefl.client import CoordinatorClient
    from edgefl.report import format_status

    status = CoordinatorClient(args.coordinator, give_up_after_s=5).status()
    print(json.dumps(status, indent=2) if args.json else format_status(status))
    return 0


def _demo(args) -> int:
    from edgefl.demo import run_demo

    config = run_config_from(args)
    device_runtimes(args.runtime)
    return run_demo(args, config)


_COMMANDS = {"serve": _serve, "devices": _devices, "export": _export, "status": _status, "demo": _demo}

if __name__ == "__main__":
    sys.exit(main())
