"""``edgefl serve``: the WSGI server and the round driver, started and stopped together.

Waitress serves the Flask app (on 127.0.0.1 unless told otherwise). With one worker
(the default) the app and the round driver share a process, and an acknowledged upload
or a newly opened round wakes the other side at once. With ``workers`` > 1 this process
binds the socket, runs the round driver and supervises that many WSGI worker processes
(``coordinator.worker``), which all accept on the socket and share nothing but the
store; a worker that dies is replaced. SIGTERM and SIGINT stop everything. Once bound,
the server writes ``server.json`` (url, pid) into the instance directory, so a launcher
that asked for port 0 learns the port without parsing logs.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Collection
from dataclasses import replace
from pathlib import Path

from coordinator import DEFAULT_CHECKIN_RATE, DEFAULT_LOBBY
from edgefl.config import RunConfig
from edgefl.protocol import RunStatusName

log = logging.getLogger("edgefl.coordinator")


class _Stop(Exception):
    pass


def _raise_stop_on_signals() -> None:
    def _on_signal(signum, _frame):
        raise _Stop(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)


def wsgi_server(app, *, threads: int, **where):
    """The hardened waitress server (``coordinator.httpserver``), reading a request's
    body only when the app's declarations accept it (``coordinator.access``)."""
    from coordinator import httpserver
    from coordinator.access import BodyPolicy

    return httpserver.create(app, threads=threads, body_policy=BodyPolicy(app), **where)


def threads_with_lobby(threads: int, lobby: int) -> int:
    """A server's threads: ``threads`` that never hold a check-in, so uploads and
    downloads are always served, and one for each check-in the lobby may hold."""
    return threads + lobby


def serve(
    *,
    instance: Path,
    config: RunConfig,
    given: Collection[str] = (),
    host: str = "127.0.0.1",
    port: int = 8080,
    threads: int = 16,
    lobby_size: int = DEFAULT_LOBBY,
    checkin_rate: float = DEFAULT_CHECKIN_RATE,
    workers: int = 1,
    db_url: str | None = None,
    admin_token: str | None = None,
    enrolment_secret: str | None = None,
    max_devices: int | None = None,
    new_run: bool = False,
    from_final: bool = False,
    publish_command: list[str] | None = None,
) -> None:
    """Serve ``instance``: a new run with ``config``, or the run the instance holds (see
    ``resumed_config``; ``given`` names the settings the user set explicitly). With
    ``new_run``, an instance whose run is over starts another (``coordinator.archive``),
    from fresh weights or, with ``from_final``, from the last run's final model. With
    ``publish_command`` (``edgefl export``), the phone artefacts follow the newest model."""
    from coordinator import archive, create_app
    from coordinator.artefacts import Publisher
    from coordinator.driver import RoundDriver, resumed_config
    from coordinator.store import Store

    instance = Path(instance)
    _raise_stop_on_signals()
    info_path = instance / "server.json"
    stop = threading.Event()
    driver_thread = publisher_thread = None
    stop_serving = lambda: None  # noqa: E731
    try:
        if workers == 1:
            app = create_app(
                {
                    "INSTANCE": str(instance),
                    "DB_URL": db_url,
                    "LONG_POLL_SLOTS": lobby_size,
                    "CHECKIN_RATE": checkin_rate,
                    "ADMIN_TOKEN": admin_token,
                    "ENROLMENT_SECRET": enrolment_secret,
                    "MAX_DEVICES": max_devices,
                }
            )
            store, lobby, wake = (
                app.extensions["edgefl.store"],
                app.extensions["edgefl.lobby"],
                app.extensions["edgefl.update_arrived"],
            )
        else:
            store, lobby, wake = Store(instance, db_url), None, None
        initial = None
        if new_run:
            chosen: dict = {}

            def next_run(previous: RunConfig, final: bytes) -> None:
                """The new run keeps the old one's settings but those given, and can start from its model."""
                chosen["config"] = replace(previous, **{name: getattr(config, name) for name in given})
                _check_fits(final if from_final else None, chosen["config"])

            record, final = archive.start_over(store, next_run)
            print(f"edgefl serve: the previous run's record and final model are in {record.parent}", flush=True)
            config, given = chosen["config"], ()
            initial = final if from_final else None
        driver = RoundDriver(store, resumed_config(store, config, given), lobby=lobby)
        driver.ensure_run(initial_checkpoint=initial)
        _say_if_over(store)
        # Without an in-process wake-up the driver polls for other processes' uploads.
        driver_thread = threading.Thread(
            target=driver.run,
            args=(stop,),
            kwargs={"wake": wake, "poll_s": 0.1 if wake else 0.02},
            name="round-driver",
            daemon=True,
        )
        if publish_command:
            publisher = Publisher(store, publish_command, instance / "publish.log")
            publisher_thread = threading.Thread(target=publisher.run, args=(stop,), name="publisher", daemon=True)
            publisher_thread.start()
        if workers == 1:
            server = wsgi_server(app, threads=threads_with_lobby(threads, lobby_size), host=host, port=port)
            stop_serving = lambda: (lobby.close(), server.shutdown())  # noqa: E731
            url = f"http://{host}:{server.effective_port}"
            driver_thread.start()
            _announce(info_path, url, instance)
            server.run()
        else:
            listener = socket.create_server((host, port), backlog=2048)
            supervisor = _Workers(
                listener,
                workers,
                ["--threads", str(threads), "--lobby", str(lobby_size), "--checkin-rate", str(checkin_rate)],
                instance,
                store.database.url,
                admin_token,
                enrolment_secret,
                max_devices,
            )
            stop_serving = supervisor.stop
            url = f"http://{host}:{listener.getsockname()[1]}"
            supervisor.start()
            driver_thread.start()
            _announce(info_path, url, instance, workers=workers)
            supervisor.supervise()
    except _Stop as why:
        log.info("stopping on %s", why)
    finally:
        stop.set()
        stop_serving()
        for thread in (driver_thread, publisher_thread):
            if thread is not None and thread.is_alive():
                thread.join(timeout=30)
        info_path.unlink(missing_ok=True)
        sys.stdout.flush()


def _check_fits(checkpoint: bytes | None, config) -> None:
    """The new run's model builds for its data (ModelError, DatasetError: one line), and
    the checkpoint it starts from, if any, fits it: checked before the old run is archived."""
    from edgefl import wire
    from edgefl.models import model_spec

    spec = model_spec(config.model, config.dataset)
    if checkpoint is None:
        return
    try:
        wire.decode(checkpoint, spec)
    except wire.WireError as error:
        raise ValueError(f"--from-final: the previous run's model does not fit --model {config.model}: {error.detail}") from None


def _say_if_over(store) -> None:
    """An instance whose run is over is still served (its model, status, dashboard);
    say so, and how to start another."""
    from contextlib import closing

    from coordinator import rounds

    with closing(store.connect()) as db:
        status = rounds.run_status(db)
    if status in (RunStatusName.FINISHED, RunStatusName.STOPPED):
        print(
            f"edgefl serve: the run on {store.instance_dir} is {status}; serving its model and record (devices are told it is"
            f" over). To start another here: edgefl serve --instance {store.instance_dir} --new-run [--from-final]",
            flush=True,
        )


def _announce(info_path: Path, url: str, instance: Path, workers: int = 1) -> None:
    info_path.write_text(json.dumps({"url": url, "pid": os.getpid()}))
    log.info("serving %s (instance %s, %d worker process%s)", url, instance, workers, "es" if workers > 1 else "")
    print(f"edgefl coordinator listening on {url}", flush=True)


class _Workers:
    """WSGI worker processes accepting on one inherited socket; a dead one is replaced."""

    def __init__(
        self,
        listener: socket.socket,
        count: int,
        serving: list[str],
        instance: Path,
        db_url: str,
        admin_token: str | None,
        enrolment_secret: str | None,
        max_devices: int | None,
    ):
        from coordinator.credentials import token_hash

        self.listener = listener
        self.count = count
        self.command = [
            sys.executable,
            "-m",
            "coordinator.worker",
            "--fd",
            str(listener.fileno()),
            "--instance",
            str(instance),
            "--db",
            db_url,
            *serving,
            *(["--max-devices", str(max_devices)] if max_devices else []),
        ]
        # Workers get the secrets' hashes only, through the environment (not the command line, which anyone can read).
        self.env = {
            **os.environ,
            "EDGEFL_ADMIN_TOKEN_SHA256": token_hash(admin_token) if admin_token else "",
            "EDGEFL_ENROLMENT_SECRET_SHA256": token_hash(enrolment_secret) if enrolment_secret else "",
        }
        self.processes: list[subprocess.Popen] = []
        self.stopping = False

    def _spawn(self) -> subprocess.Popen:
        from edgefl.processes import orphan_proof

        return subprocess.Popen(
            orphan_proof(self.command), pass_fds=(self.listener.fileno(),), stdin=subprocess.DEVNULL, env=self.env
        )

    def start(self) -> None:
        self.processes = [self._spawn() for _ in range(self.count)]

    def supervise(self) -> None:
        while True:
            time.sleep(0.5)
            for i, process in enumerate(self.processes):
                if process.poll() is not None and not self.stopping:
                    log.warning("WSGI worker %d exited with %s; starting another", process.pid, process.returncode)
                    self.processes[i] = self._spawn()

    def stop(self) -> None:
        from edgefl.processes import stop_process

        self.stopping = True
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.processes:
            stop_process(process, timeout_s=15)
        self.listener.close()
