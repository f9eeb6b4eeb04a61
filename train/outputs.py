"""What the job leaves in the output data dir besides the model: history, confusion, plots."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import torch

log = logging.getLogger("train")


def write_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True))


def write_confusion(out_dir: Path, confusion: torch.Tensor, class_names: list[str], channel: str,
                    train_counts: dict[str, int]) -> dict[str, float]:
    """confusion_matrix.csv (rows: true class, columns: predicted) and per_class_accuracy.csv."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = confusion.tolist()
    with open(out_dir / "confusion_matrix.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow([f"true \\ predicted ({channel})"] + class_names)
        for name, row in zip(class_names, rows, strict=True):
            w.writerow([name] + row)
    per_class = {}
    with open(out_dir / "per_class_accuracy.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["class", "accuracy", f"{channel}_images", "train_images"])
        for i, name in enumerate(class_names):
            total = sum(rows[i])
            per_class[name] = rows[i][i] / total if total else float("nan")
            w.writerow([name, f"{per_class[name]:.4f}", total, train_counts.get(name, 0)])
    return per_class


def learning_curves_figure(history: list[dict]):
    """Loss and accuracy per epoch, two panels: the job's learning_curves.png and the report's chart."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for key, label in (("train_loss", "train"), ("valid_loss", "valid")):
        ax_loss.plot(epochs, [h[key] for h in history], marker="o", label=label)
    for key, label in (("train_acc", "train top-1"), ("valid_acc", "valid top-1"),
                       ("valid_topk_acc", "valid top-k")):
        ax_acc.plot(epochs, [h[key] for h in history], marker="o", label=label)
    ax_loss.set(title="Loss (mean per sample)", xlabel="epoch")
    ax_acc.set(title="Accuracy", xlabel="epoch", ylim=(0, 1.02))
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    return fig


def plot_learning_curves(path: Path, history: list[dict]) -> None:
    try:
        fig = learning_curves_figure(history)
    except ImportError:
        log.info("matplotlib is not installed: no learning-curve plot")
        return
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
