"""The ``edgefl`` command: serve, devices, export, status, demo.

Each subcommand imports its room (coordinator, device_sim, export) only when run, so
``edgefl --help`` and a mistyped flag answer at once. Every failure a user can cause
ends in one line on stderr and a non-zero exit: flags are checked as they are parsed
(``edgefl.app.flags``), and the usual mistakes later (unreachable coordinators,
unwritable paths, missing files) are caught here and named by the flag the user typed.
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import sys
from dataclasses import replace
from pathlib import Path

from edgefl.app.flags import DEMO_DEFAULTS, parse


class CliError(Exception):
    """A user-facing failure: printed as one line, exit status 1."""


def given_settings(args: argparse.Namespace) -> dict[str, tuple[object, str]]:
    """The run settings the user gave, each with the name it was given by: from the
    ``--config`` file, then ``EDGEFL_*`` variables, then flags (the later wins)."""
    from edgefl.config import RunConfig, env_name, flag_of, settings_from_env, settings_from_file

    given: dict[str, tuple[object, str]] = {}
    try:
        if getattr(args, "config", None) is not None:
            given |= {name: (value, f"{name} in {args.config}") for name, value in settings_from_file(args.config).items()}
        given |= {name: (value, env_name(name)) for name, value in settings_from_env(os.environ).items()}
    except ValueError as error:
        raise CliError(str(error)) from None
    names = [name for name, _, _ in RunConfig().settings()]
    return given | {name: (getattr(args, name), flag_of(name)) for name in names if getattr(args, name, None) is not None}


def run_config_from(args: argparse.Namespace, defaults: dict | None = None):
    """The run configuration the user gave (over ``defaults``), and where each setting
    given was given (its flag, file or variable); a problem names it that way."""
    from edgefl.config import ConfigError, RunConfig, flag_of

    given = given_settings(args)
    try:
        config = RunConfig(**{**(defaults or {}), **{name: value for name, (value, _) in given.items()}})
    except ConfigError as error:
        raise CliError(error.describe(lambda name: given[name][1] if name in given else flag_of(name))) from None
    return config, {name: source for name, (_, source) in given.items()}


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

    config, given = run_config_from(args)
    if args.from_final and not args.new_run:
        raise CliError("--from-final starts a new run from the last one's model: give --new-run too")
    admin_token = _read_secret(args.admin_token_file, "--admin-token-file")
    enrolment_secret = _read_secret(args.enrolment_secret_file, "--enrolment-secret-file")
    try:
        serve(
            instance=args.instance,
            config=config,
            given=given,
            host=args.host,
            port=args.port,
            threads=args.threads,
            lobby_size=args.lobby,
            checkin_rate=args.checkin_rate,
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
    from device_sim.fleet import run_fleet
    from device_sim.settings import from_arguments

    num_devices = args.num_devices or args.count
    if args.first_index + args.count > num_devices:
        raise CliError(
            f"devices {args.first_index}..{args.first_index + args.count - 1} do not fit a population of {num_devices} (--num-devices)"
        )
    dataset_given = args.dataset is not None  # else the run's, once the coordinator says which
    try:
        settings = from_arguments(args, num_devices=num_devices, **({} if dataset_given else {"dataset": "digits"}))
    except ValueError as exc:
        raise CliError(str(exc)) from None
    if dataset_given:
        check_partition(settings.dataset, settings.partition, num_devices, settings.seed)
    secret = _read_secret(args.enrolment_secret_file, "--enrolment-secret-file")

    def check_the_run(settings) -> None:
        """What the coordinator's run asks of these devices, checked before any of them contacts it."""
        status = _check_reachable(args.coordinator, args.wait_for_coordinator)
        if status.run is not None:
            check_model_given(status.run.config.model, settings)
            check_trainable_on_litert(status.run.config.model, settings.dataset, settings.runtimes)

    fleet = dict(first_index=args.first_index, count=args.count, per_process=args.per_process, enrolment_secret=secret)
    if dataset_given:  # the hosts can get ready (imports, data) while the coordinator is asked, or starts
        return run_fleet(settings, args.log_dir, checks=lambda: check_the_run(settings), **fleet)
    status = _check_reachable(args.coordinator, args.wait_for_coordinator)
    if status.run is not None:
        try:
            settings = replace(settings, dataset=status.run.config.dataset)
        except ValueError as exc:  # the run's data is not on this host
            raise CliError(f"the run's dataset: {exc}") from None
    check_partition(settings.dataset, settings.partition, num_devices, settings.seed)
    check_the_run(settings)
    return run_fleet(settings, args.log_dir, **fleet)


def check_partition(dataset: str, partition: str, num_devices: int, seed: int) -> None:
    """What every device host will compute (the data and its partition), computed once
    here, so that a bad file or spec fails in one line before anything starts."""
    from edgefl.datasets import device_shards, load_dataset

    try:
        device_shards(dataset, partition, num_devices, seed, indices=())
    except ValueError as exc:
        raise CliError(str(exc)) from None
    finally:
        load_dataset.cache_clear()  # this process trains nothing: the data need not stay in its memory


def check_runtime(flag: str) -> None:
    """The demo's --runtime, checked as the devices' settings check it."""
    from device_sim.settings import DeviceSettings

    try:
        DeviceSettings(runtime=flag)
    except ValueError as exc:
        raise CliError(str(exc)) from None


def _check_reachable(url: str, wait_s: float = 5.0):
    """The coordinator's status, asked every quarter second for up to ``wait_s``; else CoordinatorUnreachable."""
    from edgefl.client import CoordinatorClient

    return CoordinatorClient(url, give_up_after_s=wait_s, backoff_cap_s=0.25).status()


def check_model_given(model: str, settings) -> None:
    """Keras devices build the run's model, which runs its code: only a built-in, or the
    model the devices' operator names with --model (the coordinator's word is not enough)."""
    from edgefl.models import BUILT_IN_MODELS

    if model not in (*BUILT_IN_MODELS, settings.model):
        if "keras" in settings.runtimes:
            raise CliError(f"the run trains model {model}: give it to the devices too (--model {model}); they build no other")
        raise CliError(f"the run trains model {model}: give it with --model {model} to check it fits LiteRT devices")


def check_trainable_on_litert(model: str, dataset: str, runtimes: list[str]) -> None:
    """LiteRT devices train the on-device file, which holds a documented set of layers
    (``export.ondevice``): a model outside it is refused here, in one line naming the
    layer, rather than by every LiteRT device once it asks for the file."""
    if "litert" not in runtimes:
        return
    from edgefl.logs import native_stderr_silenced
    from edgefl.models import build_model
    from export.ondevice import unsupported_layer

    try:
        with native_stderr_silenced():
            refused = unsupported_layer(build_model(model, dataset))
    except ValueError as exc:
        raise CliError(str(exc)) from None
    if refused:
        raise CliError(f"--runtime litert: model {model} cannot train on LiteRT devices: {refused} (Keras devices can)")


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
    from edgefl.datasets import dataset_problem
    from edgefl.models import BUILT_IN_MODELS, model_problem, model_spec

    variants = [v for v in args.variants.split(",") if v]
    known = ("float32", "float16", "dynamic", "int8")
    if not variants or set(variants) - set(known):
        raise CliError(f"bad --variants {args.variants!r}: a comma-separated choice of {', '.join(known)}")
    train_batch = args.train_batch
    if args.checkpoint is not None:
        model, dataset = args.model or "cnn", args.dataset or "digits"
        if problem := model_problem(model):
            raise CliError(f"--model {model} {problem}")
        if not args.checkpoint.is_file():
            raise CliError(f"no checkpoint file at {args.checkpoint}")
        writable_directory(args.out, "--out")
        data = args.checkpoint.read_bytes()
        round_number = args.round
        train_batch = 10 if train_batch is None else train_batch
    else:
        writable_directory(args.out, "--out")
        client = CoordinatorClient(args.coordinator, give_up_after_s=5)
        status = client.status()
        if not status.run or not status.model:
            raise CliError(f"the coordinator at {args.coordinator} has no checkpoint yet")
        model, round_number = status.run.config.model, status.model.version
        dataset = args.dataset or status.run.config.dataset
        if model not in (*BUILT_IN_MODELS, args.model):  # the coordinator's word alone runs no code here
            raise CliError(f"the run trains model {model}: give it with --model {model} to export it (building it runs its code)")
        train_batch = status.run.config.batch_size if train_batch is None else train_batch
        data = client.download_checkpoint(status.model.sha256)
    if problem := dataset_problem(dataset):
        raise CliError(f"--dataset {problem}")
    try:
        weights, metadata = wire.decode(data, model_spec(model, dataset))
    except wire.WireError as exc:
        raise CliError(f"the checkpoint does not fit model {model}: {exc.detail}") from None
    except ValueError as exc:  # the model or the data (ModelError, DatasetError): one line
        raise CliError(str(exc)) from None
    if round_number is None and metadata.get("version", "").isdigit():
        round_number = int(metadata["version"])
    from edgefl.app.report import export_table
    from edgefl.artefacts import MODEL_CARD
    from edgefl.logs import native_stderr_silenced
    from export import export_checkpoint

    try:
        with native_stderr_silenced():  # the TFLite converter's and LiteRT's native chatter
            card = export_checkpoint(
                weights=weights,
                model_name=model,
                dataset=dataset,
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
    print(status.model_dump_json(indent=2) if args.json else format_status(status))
    return 0


def _demo(args) -> int:
    from edgefl.app.demo import run_demo

    config, _ = run_config_from(args, DEMO_DEFAULTS)
    check_runtime(args.runtime)
    check_partition(config.dataset, args.partition, args.count, args.data_seed)
    check_trainable_on_litert(config.model, config.dataset, args.runtime.split(","))
    return run_demo(args, config)


_COMMANDS = {"serve": _serve, "devices": _devices, "export": _export, "status": _status, "demo": _demo}

if __name__ == "__main__":
    sys.exit(main())
