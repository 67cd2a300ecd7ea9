"""``edgefl serve``: the WSGI server and the round driver, started and stopped together.

Waitress serves the Flask app (on 127.0.0.1 unless told otherwise); the round driver
runs in a thread. SIGTERM and SIGINT stop both. Once bound,
the server writes ``server.json`` (url, pid) into the instance directory, so a
launcher that asked for port 0 learns the port without parsing logs.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Collection

from edgefl.config import RunConfig

log = logging.getLogger("edgefl.coordinator")


_FREE_THREADS = 4


class _Stop(Exception):
    pass


def serve(
    *, instance: Path, config: RunConfig, given: Collection[str] = (), host: str = "127.0.0.1", port: int = 8080,
    threads: int = 16, admin_token: str | None = None,
) -> None:
    """Serve ``instance``: a new run with ``config``, or the run the instance holds (see
    ``resumed_config``; ``given`` names the settings the user set explicitly)."""
    import waitress

    from coordinator import DEFAULT_MAX_UPLOAD_BYTES, create_app
    from coordinator.driver import RoundDriver, resumed_config

    instance = Path(instance)
    instance.mkdir(parents=True, exist_ok=True)
    # All but a few threads may hold a check-in until the next round opens; the rest
    # keep serving uploads and checkpoints.
    app = create_app(
        {"INSTANCE": str(instance), "LONG_POLL_SLOTS": max(0, threads - _FREE_THREADS), "ADMIN_TOKEN": admin_token}
    )
    lobby = app.extensions["edgefl.lobby"]
    store = app.extensions["edgefl.store"]
    stop = threading.Event()

    def _on_signal(signum, _frame):
        raise _Stop(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    server = None
    driver_thread = None
    info_path = instance / "server.json"
    try:
        driver = RoundDriver(store, resumed_config(store, config, given), lobby=lobby)
        driver.ensure_run()
        server = waitress.create_server(
            app,
            host=host,
            port=port,
            threads=threads,
            channel_timeout=120,
            # Deltas and checkpoints are megabytes: read in large chunks and keep bodies
            # in memory instead of waitress's default 8 KB reads and temp-file spooling.
            recv_bytes=1 << 18,
            inbuf_overflow=DEFAULT_MAX_UPLOAD_BYTES,
            outbuf_overflow=DEFAULT_MAX_UPLOAD_BYTES,
        )
        url = f"http://{host}:{server.effective_port}"

        driver_thread = threading.Thread(
            target=driver.run, args=(stop,), kwargs={"wake": app.extensions["edgefl.update_arrived"]},
            name="round-driver", daemon=True,
        )
        driver_thread.start()
        info_path.write_text(json.dumps({"url": url, "pid": os.getpid()}))
        log.info("serving %s (instance %s)", url, instance)
        print(f"edgefl coordinator listening on {url}", flush=True)
        server.run()
    except _Stop as why:
        log.info("stopping on %s", why)
    finally:
        stop.set()
        lobby.close()
        if server is not None:
            server.close()
        if driver_thread is not None:
            driver_thread.join(timeout=30)
        info_path.unlink(missing_ok=True)
        sys.stdout.flush()
