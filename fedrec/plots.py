"""Learning curves of a run: ``curves.png`` in the run folder, drawn from ``metrics.jsonl``.

``scalars`` turns one metrics.jsonl line into named curve points; the plot and the TensorBoard
logger (fedrec/loggers.py) both use it, so the two show the same curves under the same names.
"""

from __future__ import annotations

import math
from pathlib import Path

from fedrec.runs import _atomic_write

# Centralised epochs report ``loss`` (fedrec/train.py); federated rounds report the node mean ``train-loss``.
LOSS_KEYS = ("loss", "train-loss")


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def scalars(line: dict) -> dict[str, float]:
    """``train/loss``, ``valid/<metric>``, ``test/<metric>``, ``seconds/train``, ``seconds/eval`` of one line."""
    out: dict[str, float] = {}
    train = line.get("train") or {}
    loss = next((train[k] for k in LOSS_KEYS if _finite(train.get(k))), None)
    if loss is not None:
        out["train/loss"] = float(loss)
    for split in ("valid", "test"):
        for metric, value in (line.get(split) or {}).items():
            if _finite(value):
                out[f"{split}/{metric}"] = float(value)
    for name in ("train", "eval"):
        if _finite(line.get(f"{name}_s")):
            out[f"seconds/{name}"] = float(line[f"{name}_s"])
    return out


def write_curves(lines: list[dict], path: str | Path, select_metric: str, *, unit: str = "round",
                 best_round: int | None = None) -> Path:
    """Plot train loss per ``unit`` and, on the evaluated ones, validation ``select_metric`` and NDCG@K."""
    import matplotlib

    matplotlib.use("Agg")  # files only: never open a window, work without a display
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    path = Path(path)
    points = [(int(line["round"]), scalars(line)) for line in lines]
    k = select_metric.partition("@")[2]
    wanted = list(dict.fromkeys([f"valid/{select_metric}", f"valid/ndcg@{k}"]))
    loss = [(r, s["train/loss"]) for r, s in points if "train/loss" in s]
    valid = {tag: [(r, s[tag]) for r, s in points if tag in s] for tag in wanted}
    valid = {tag: pts for tag, pts in valid.items() if pts}

    fig, axes = plt.subplots(1, 2 if valid else 1, figsize=(10 if valid else 5, 3.6), squeeze=False)
    ax = axes[0][0]
    if loss:
        ax.plot(*zip(*loss), marker="." if len(loss) < 50 else None, color="tab:blue")
    else:
        ax.text(0.5, 0.5, "no train loss recorded", ha="center", va="center", transform=ax.transAxes)
    ax.set(title="train loss", xlabel=unit, ylabel="loss")
    if valid:
        ax = axes[0][1]
        for tag, pts in valid.items():
            ax.plot(*zip(*pts), marker="o" if len(pts) < 50 else None, markersize=3, label=tag.split("/", 1)[1])
        if best_round:
            ax.axvline(best_round, color="grey", linestyle=":", label=f"best {unit} {best_round}")
        ax.set(title="validation", xlabel=unit)
        ax.legend(fontsize="small")
    for ax in axes[0]:
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # rounds/epochs are whole numbers
    fig.tight_layout()
    try:  # via a temporary name, like every run-folder file: a reader never sees half a picture
        _atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    finally:
        plt.close(fig)
    return path
