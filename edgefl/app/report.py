"""Human-facing views of a run's status (``edgefl.protocol.RunStatus``): a round
table, a progress line, a plot."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from edgefl.protocol import RoundSummary, RunStatus

_COLUMNS = ("round", "accuracy", "loss", "devices", "MB down", "MB up", "seconds")


def figure(value: float | None, places: int = 4) -> str:
    """A figure the API may give as null (a model that could not be evaluated)."""
    return "-" if value is None else f"{value:.{places}f}"


def round_row(entry: RoundSummary) -> tuple[str, ...]:
    return (
        str(entry.round),
        figure(entry.accuracy),
        figure(entry.loss),
        f"{entry.reported}/{entry.selected}",
        f"{entry.bytes_down / 1e6:.1f}",
        f"{entry.bytes_up / 1e6:.1f}",
        f"{entry.seconds:.2f}",
    )


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    rows = [header, *rows]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def rounds_table(history: Sequence[RoundSummary]) -> str:
    """One row per round, with more columns when a run has them: for quantized uploads,
    what they would have weighed as float32; with the devices' personalisation reports,
    accuracy on their held-out examples of the global model and of their own."""
    columns = {}
    if any(e.upload_bits for e in history):
        columns["MB up as float32"] = lambda e: f"{e.bytes_up_float32 / 1e6:.1f}"
    if any(e.personalization for e in history):
        columns["on-device global"] = lambda e: f"{e.personalization['global_accuracy']:.4f}"
        columns["personalised"] = lambda e: f"{e.personalization['personalized_accuracy']:.4f}"

    def cell(column, entry: RoundSummary) -> str:
        try:
            return column(entry)
        except (KeyError, TypeError):  # a round without the figure
            return "-"

    return _table((*_COLUMNS, *columns), [(*round_row(e), *(cell(c, e) for c in columns.values())) for e in history])


def export_table(card: dict, out_dir: Path) -> str:
    """What ``edgefl export`` wrote, checked on LiteRT against Keras."""
    rows = [
        (
            f["file"],
            f"{f['bytes'] / 1e6:.2f}",
            f"{f['accuracy']:.4f}",
            f"{f['top1_agreement']:.2%}",
            f"{f['max_abs_logit_diff']:.2g}",
            f"{f['latency_ms']:.3f}",
        )
        for f in card["files"]
    ]
    lines = [
        f"model {card['model']}, round {card['round']}, Keras accuracy {card['evaluation']['keras_accuracy']:.4f}"
        f" on {card['evaluation']['examples']} held-out examples; files in {out_dir}, run by LiteRT:",
        _table(("file", "MB", "accuracy", "agreement", "max |diff|", "ms/image"), rows),
    ]
    if training := card.get("training"):
        lines.append(
            f"{training['file']}: {training['bytes'] / 1e6:.2f} MB, signatures {', '.join(training['signatures'])},"
            f" batch {training['batch_size']}, builtin ops only: {'yes' if not training['custom_ops'] else 'NO'},"
            f" one SGD step vs Keras: max |diff| {training['one_sgd_step_max_abs_diff_vs_keras']:.1g}"
        )
    return "\n".join(lines)


def progress_line(entry: RoundSummary, total_rounds: int) -> str:
    return (
        f"round {entry.round:>3}/{total_rounds}  accuracy {figure(entry.accuracy)}  loss {figure(entry.loss)}"
        f"  devices {entry.reported}/{entry.selected}  {entry.seconds:.2f}s"
    )


def format_status(status: RunStatus) -> str:
    run = status.run
    if not run or not status.model:
        return "no run yet"
    config = run.config
    lines = [
        f"run: {run.status}, model {config.model} on {config.dataset},"
        f" {len(status.history)}/{config.rounds} rounds, {status.devices} devices registered",
        f"model: version {status.model.version}, sha256 {status.model.sha256[:16]}…",
    ]
    current = status.round
    if current:
        lines.append(
            f"round {current.number}: {current.status}, {current.reported}/{current.target_reports}"
            f" reports, {current.selected} selected, {current.seconds_left:.0f}s to deadline"
        )
    if status.history:
        lines += ["", rounds_table(status.history)]
    if status.abandoned:
        lines += ["", f"abandoned rounds ({len(status.abandoned)}; each was retried from the last good model):"]
        lines += [f"  round {a.round}: {a.reason}: {a.detail}" for a in status.abandoned[-5:]]
    return "\n".join(lines)


def plot_history(history: Sequence[RoundSummary], path: Path, *, title: str = "edgefl run") -> Path:
    """Accuracy, loss and participation per round, as one PNG. Rounds are whole numbers,
    so every round axis ticks at integers; a missing figure (None: a round whose model
    could not be evaluated) is a gap in its line, not an error."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    def values(key: str) -> list[float]:
        return [float("nan") if getattr(e, key) is None else getattr(e, key) for e in history]

    rounds = [e.round for e in history]
    fig, (ax_acc, ax_loss, ax_dev) = plt.subplots(1, 3, figsize=(13, 3.6))
    ax_acc.plot(rounds, values("accuracy"), marker="o")
    ax_acc.set(title="test accuracy", xlabel="round", ylim=(0, 1))
    ax_loss.plot(rounds, values("loss"), marker="o", color="tab:red")
    ax_loss.set(title="test loss", xlabel="round")
    ax_loss.set_ylim(bottom=0)
    ax_dev.bar(rounds, values("selected"), color="lightgray", label="selected")
    ax_dev.bar(rounds, values("reported"), color="tab:green", label="reported")
    ax_dev.set(title="devices", xlabel="round")
    ax_dev.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax_dev.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2, frameon=False)
    for ax in (ax_acc, ax_loss, ax_dev):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
        if rounds:  # half a round either side, so even a single round gets an integer tick
            ax.set_xlim(min(rounds) - 0.5, max(rounds) + 0.5)
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
