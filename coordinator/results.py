"""A run's round history as files people take away: a CSV and TensorBoard event files.

Written under ``INSTANCE/results/<run>/`` (``run-YYYYmmdd-HHMMSS``, the run's creation
time, the name ``coordinator.archive`` gives its record), so that
``tensorboard --logdir INSTANCE/results`` shows every run of an instance side by side.

Both are computed whole from the store's history (``records.history``) after every
round: what they say is what the store says, a crash between a commit and the write
loses nothing (the next write has it), and a restarted coordinator needs no memory of
what it wrote. The CSV is replaced atomically. The event file holds only what is fixed
once a round is evaluated (not its late or dropped counts, which late uploads still
change), with the round's evaluation time as wall time, so each new version is the
previous one plus the new round's events: it is appended, as TensorBoard's incremental
reader expects, and replaced only if the file on disk is not a prefix (a torn write).

The events are written with TensorBoard's own record writer and protocol buffers (no
TensorFlow needed), as scalars per round: the test accuracy and loss, participation,
bytes, phase seconds and every numeric figure of the round's metrics.
"""

from __future__ import annotations

import csv
import io
import os
import time
from collections.abc import Iterator
from pathlib import Path

from edgefl.protocol import RoundStatus

RESULTS_DIR = "results"
CSV_FILE = "rounds.csv"
EVENTS_FILE = "events.out.tfevents.edgefl"  # TensorBoard reads files named events.out.tfevents.*

_FIXED_COLUMNS = (
    "number",
    "status",
    "selected",
    "reported",
    "dropped",
    "late",
    "bytes_down",
    "bytes_up",
    "collecting_s",
    "aggregating_s",
    "evaluating_s",
    "opened_at",
    "closed_at",
    "committed_at",
    "abandon_reason",
)


def run_folder(instance_dir: Path, created_at: float) -> Path:
    return instance_dir / RESULTS_DIR / time.strftime("run-%Y%m%d-%H%M%S", time.gmtime(created_at))


def numeric_leaves(figures: dict | None, prefix: str = "") -> Iterator[tuple[str, float]]:
    """Every number in a (nested) dict of figures, named by its path (``secagg/masked``)."""
    for key, value in (figures or {}).items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            yield from numeric_leaves(value, f"{name}/")
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            yield name, float(value)


def _row(record: dict) -> dict:
    row = {column: record.get(column) for column in _FIXED_COLUMNS}
    phases = record.get("phase_seconds") or {}
    row.update({f"{phase}_s": seconds for phase, seconds in phases.items()})
    row.update(dict(numeric_leaves(record.get("metrics"), "metrics/")))
    return row


def history_csv(history: list[dict]) -> str:
    """One row per round, oldest first; the metrics' columns are every figure any round has."""
    rows = [_row(record) for record in history]
    extra = sorted({column for row in rows for column in row} - set(_FIXED_COLUMNS))
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=[*_FIXED_COLUMNS, *extra], lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def _scalars(record: dict) -> Iterator[tuple[str, float]]:
    metrics = record.get("metrics") or {}
    for name in ("accuracy", "loss"):
        if isinstance(metrics.get(name), (int, float)):
            yield f"test/{name}", float(metrics[name])
    for name in ("selected", "reported", "bytes_up"):
        if record.get(name) is not None:
            yield f"round/{name}", float(record[name])
    for phase, seconds in (record.get("phase_seconds") or {}).items():
        if seconds is not None:
            yield f"seconds/{phase}", float(seconds)
    for name, value in numeric_leaves(metrics):
        if name not in ("accuracy", "loss"):
            yield f"metrics/{name}", value


def history_events(history: list[dict], created_at: float) -> bytes:
    """TensorBoard's event file of the finished rounds: a file-version event, then
    each committed round's scalars at step = its number."""
    from tensorboard.compat.proto import event_pb2, summary_pb2
    from tensorboard.summary.writer.record_writer import RecordWriter

    out = io.BytesIO()
    writer = RecordWriter(out)
    writer.write(event_pb2.Event(wall_time=created_at, file_version="brain.Event:2").SerializeToString())
    for record in history:
        if record["status"] != RoundStatus.COMMITTED or record.get("evaluated_at") is None:
            continue
        summary = summary_pb2.Summary(
            value=[summary_pb2.Summary.Value(tag=tag, simple_value=value) for tag, value in _scalars(record)]
        )
        event = event_pb2.Event(wall_time=record["evaluated_at"], step=record["number"], summary=summary)
        writer.write(event.SerializeToString())
    return out.getvalue()


def _replace(path: Path, data: bytes) -> None:
    partial = path.with_name(".partial")  # not named *tfevents*: TensorBoard would read it
    partial.write_bytes(data)
    os.replace(partial, path)


def _extend(path: Path, data: bytes) -> None:
    """Append what ``data`` adds to the file, if the file is its prefix; else replace it."""
    try:
        old = path.read_bytes()
    except FileNotFoundError:
        old = None
    if old is not None and data.startswith(old):
        if len(data) > len(old):
            with path.open("ab") as file:
                file.write(data[len(old) :])
        return
    _replace(path, data)


def write_results(instance_dir: Path, created_at: float, history: list[dict]) -> Path:
    """Bring the run's CSV and event file up to date; the folder they are in."""
    folder = run_folder(instance_dir, created_at)
    folder.mkdir(parents=True, exist_ok=True)
    _replace(folder / CSV_FILE, history_csv(history).encode())
    _extend(folder / EVENTS_FILE, history_events(history, created_at))
    return folder
