"""Owns the life of TFF's C++ ``worker_binary``, the process that runs TFF computations.

The coordinator does not need it (its aggregation runs compiled, see
``coordinator.mapreduce``); TFF's own simulation in the benchmark and the tests that
check compiled rounds against TFF's executor do. TFF 0.87 executes every computation in a ``worker_binary`` child that its own context
starts lazily and stops only in a ``__del__`` that may never run; a worker left behind
keeps its parent's stdout open and hangs test runners and CI pipes. Here the worker is
started explicitly, writes to a log file, is told by the kernel to die with its parent
(PR_SET_PDEATHSIG, so even a SIGKILLed coordinator leaves nothing behind), and is
stopped by ``stop()`` and by ``atexit``. Start it
from the main thread (see ``edgefl.processes``). The execution
context is assembled from public ``tff.framework`` pieces around that worker.
"""

from __future__ import annotations

import atexit
import signal
import subprocess
import threading
import time
from pathlib import Path

from edgefl.processes import free_port, orphan_proof, stop_process

_STARTUP_TIMEOUT_S = 60.0
_GRPC_MAX_MESSAGE_BYTES = 2_000_000_000


def worker_binary_path() -> Path:
    import tensorflow_federated as tff

    return Path(tff.__file__).parent / "data" / "worker_binary"


class TffRuntime:
    """One worker_binary and the TFF execution context that talks to it."""

    def __init__(self, *, log_path: Path | str | None = None):
        self._log_path = Path(log_path) if log_path else None
        self._process: subprocess.Popen | None = None
        self._context = None
        self._channel = None
        self._lock = threading.Lock()
        atexit.register(self.stop)

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    def start(self) -> None:
        """Start the worker and install a TFF context bound to it (idempotent)."""
        with self._lock:
            if self._process is None or self._process.poll() is not None:
                self._launch_locked()
        self.install()

    def _launch_locked(self) -> None:
        import grpc
        import tensorflow_federated as tff

        port = free_port()
        log = open(self._log_path, "ab") if self._log_path else subprocess.DEVNULL
        try:
            self._process = subprocess.Popen(
                orphan_proof([str(worker_binary_path()), f"--port={port}"], signal.SIGKILL),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                close_fds=True,
            )
        finally:
            if log is not subprocess.DEVNULL:
                log.close()
        options = [
            ("grpc.max_message_length", _GRPC_MAX_MESSAGE_BYTES),
            ("grpc.max_receive_message_length", _GRPC_MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", _GRPC_MAX_MESSAGE_BYTES),
        ]
        self._channel = grpc.insecure_channel(f"localhost:{port}", options)
        stub = tff.framework.RemoteExecutorGrpcStub(self._channel)
        deadline = time.monotonic() + _STARTUP_TIMEOUT_S
        while not stub.is_ready:
            if self._process.poll() is not None or time.monotonic() > deadline:
                self._stop_locked()
                raise RuntimeError("TFF worker_binary did not start; see its log")
            time.sleep(0.05)

        def executor_fn(cardinalities):
            executor = tff.framework.RemoteExecutor(stub)
            executor.set_cardinalities({tff.CLIENTS: 0, **cardinalities})
            return executor

        def compile_for_the_worker(computation):
            """TFF's native compilation, after TFF's test compiler has made secure sums
            plain ones (the worker has no secure aggregation: TFF only simulates it)."""
            return tff.backends.native.desugar_and_transform_to_native(
                tff.backends.test.replace_secure_intrinsics_with_bodies(computation)
            )

        self._context = tff.framework.SyncExecutionContext(
            executor_fn=tff.framework.ResourceManagingExecutorFactory(executor_fn),
            compiler_fn=compile_for_the_worker,
            transform_args=tff.tensorflow.transform_args,
            transform_result=tff.tensorflow.transform_result,
        )

    def install(self) -> None:
        """Make this runtime TFF's context in the calling thread (TFF's stack is thread-local)."""
        import tensorflow_federated as tff

        tff.framework.set_default_context(self._context)

    def stop(self) -> None:
        with self._lock:
            self._stop_locked()

    def _stop_locked(self) -> None:
        process, self._process = self._process, None
        channel, self._channel = self._channel, None
        if channel is not None:
            channel.close()
        stop_process(process, timeout_s=5)

    def __enter__(self) -> TffRuntime:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
