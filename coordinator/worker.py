"""One WSGI worker process of ``edgefl serve --workers N`` (started by the server, not by
users): the Flask app on a listening socket it inherited, over the shared store.

It holds no round state of its own. Held check-ins are woken by a thread watching
the store for the round driver's transitions (``lobby.watch_rounds``), since the driver
runs in another process.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import threading

from coordinator import create_app
from coordinator.lobby import watch_rounds
from coordinator.server import _raise_stop_on_signals, _Stop, threads_with_lobby, wsgi_server
from edgefl import logs

log = logging.getLogger("edgefl.coordinator")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m coordinator.worker")
    parser.add_argument("--fd", type=int, required=True, help="the listening socket, inherited")
    parser.add_argument("--instance", required=True)
    parser.add_argument("--db", required=True)
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--lobby", type=int, required=True)
    parser.add_argument("--checkin-rate", type=float, required=True)
    parser.add_argument("--max-devices", type=int)
    args = parser.parse_args(argv)
    logs.configure()  # the level serve was given, inherited
    _raise_stop_on_signals()

    app = create_app(
        {
            "INSTANCE": args.instance,
            "DB_URL": args.db,
            "LONG_POLL_SLOTS": args.lobby,
            "CHECKIN_RATE": args.checkin_rate,
            "ADMIN_TOKEN_SHA256": os.environ.get("EDGEFL_ADMIN_TOKEN_SHA256") or None,
            "WORKER_ID": str(os.getpid()),
            "ENROLMENT_SECRET_SHA256": os.environ.get("EDGEFL_ENROLMENT_SECRET_SHA256") or None,
            "MAX_DEVICES": args.max_devices,
        }
    )
    lobby, stop = app.extensions["edgefl.lobby"], threading.Event()
    watcher = threading.Thread(target=watch_rounds, args=(app.extensions["edgefl.store"], lobby, stop), daemon=True)
    server = wsgi_server(app, threads=threads_with_lobby(args.threads, args.lobby), sock=socket.socket(fileno=args.fd))
    try:
        watcher.start()
        server.run()
    except _Stop:
        pass
    finally:
        stop.set()
        lobby.close()
        server.shutdown()


if __name__ == "__main__":
    main()
