"""Loss curves of one or several runs, and the comparison table."""

from __future__ import annotations

import json
from pathlib import Path


def read_metrics(run: Path) -> tuple[list[dict], list[dict]]:
    """(training records, validation records) of a run's metrics.jsonl, each in step order.

    A run killed after its last checkpoint and resumed logs the steps past that checkpoint
    again; the file keeps both, and the later record of a step (the resumed run's) wins here."""
    train, val = {}, {}
    path = Path(run) / "metrics.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{run} has no metrics.jsonl (is it a flash-depth run folder?)")
    for line in path.read_text().splitlines():
        record = json.loads(line)
        (val if "val_loss" in record else train)[record["step"]] = record
    return [train[k] for k in sorted(train)], [val[k] for k in sorted(val)]


def plot_runs(runs: list[Path], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for run in runs:
        train, val = read_metrics(run)
        label = Path(run).name
        if len(runs) == 1 and train:
            ax.plot([r["tokens"] for r in train], [r["loss"] for r in train], alpha=0.4, label=f"{label} train")
        if val:
            ax.plot([r["tokens"] for r in val], [r["val_loss"] for r in val], marker="o", ms=3, label=f"{label} val")
    ax.set_xlabel("training tokens")
    ax.set_ylabel("loss (nats / token)")
    ax.set_title("validation loss" if len(runs) > 1 else f"loss: {Path(runs[0]).name}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


def compare_table(runs: list[Path]) -> str:
    rows = ["| run | mechanism | norm | params | tokens | final val loss | tokens/s |", "|---|---|---|---|---|---|---|"]
    for run in runs:
        summary_file = Path(run) / "summary.json"
        if summary_file.exists():
            s = json.loads(summary_file.read_text())
        else:  # a run still going or killed: take what metrics.jsonl has
            _, val = read_metrics(run)
            s = {"final_val_loss": val[-1]["val_loss"] if val else None, "tokens": val[-1]["tokens"] if val else 0}
        loss = f"{s['final_val_loss']:.4f}" if s.get("final_val_loss") is not None else "-"
        rows.append(f"| {Path(run).name} | {s.get('depth_mechanism', '-')} | {s.get('norm_position', '-')} "
                    f"| {s.get('params', 0) / 1e6:.2f}M | {s.get('tokens', 0):,} | {loss} "
                    f"| {s.get('tokens_per_s', 0):,.0f} |")
    return "\n".join(rows) + "\n"
