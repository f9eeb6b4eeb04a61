"""The report's charts: matplotlib figures returned as PNG data URIs, so the HTML file stands alone."""

from __future__ import annotations

import base64
import io
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from train import outputs  # noqa: E402

MANY = 30   # above this many classes, class names are left off the axes


def _uri(fig) -> str:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _axes(ax, title: str, xlabel: str, ylabel: str = "") -> None:
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.grid(alpha=0.3)
    if xlabel in ("epoch", "training step"):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _log_if_wide(ax, values) -> None:
    """A diverging loss spans many orders of magnitude: on a linear axis the healthy part is a flat line."""
    finite = [v for v in values if v == v and 0 < v < float("inf")]
    if finite and max(finite) / min(finite) > 100:
        ax.set_yscale("log")


def learning_curves(history: list[dict]) -> str:
    fig = outputs.learning_curves_figure(history)  # the job's learning_curves.png, drawn once
    fig.axes[0].xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.axes[1].xaxis.set_major_locator(MaxNLocator(integer=True))
    _log_if_wide(fig.axes[0], [h[k] for h in history for k in ("train_loss", "valid_loss")])
    return _uri(fig)


def batch_loss(series: list[tuple[int, float]], steps_per_epoch: int | None) -> str:
    fig, ax = plt.subplots(figsize=(11, 3.4))
    ax.plot([s for s, _ in series], [v for _, v in series], lw=1, marker="." if len(series) < 200 else None)
    if steps_per_epoch:
        for boundary in range(steps_per_epoch, series[-1][0], steps_per_epoch):
            ax.axvline(boundary + 0.5, color="grey", lw=0.6, ls=":")
    _axes(ax, "Training loss per saved batch (dotted lines: epoch ends)", "training step", "loss")
    _log_if_wide(ax, [v for _, v in series])
    return _uri(fig)


def learning_rate(history: list[dict]) -> str:
    fig, ax = plt.subplots(figsize=(5.5, 3.2))
    ax.plot([h["epoch"] for h in history], [h["lr"] for h in history], marker="o")
    _axes(ax, "Learning rate at the start of each epoch", "epoch", "lr")
    _log_if_wide(ax, [h["lr"] for h in history])
    return _uri(fig)


def gradient_norms(groups: dict[str, list[tuple[int, float]]]) -> str:
    fig, ax = plt.subplots(figsize=(11, 3.6))
    for group, series in groups.items():
        ax.plot([s for s, _ in series], [max(v, 1e-12) for _, v in series], lw=1.2, label=group)
    ax.set_yscale("log")
    _axes(ax, "Gradient L2 norm per layer group", "training step", "norm (log scale)")
    ax.legend(ncol=min(6, len(groups)), fontsize=8)
    return _uri(fig)


def utilization(system: list[dict[str, str]]) -> str:
    t = [float(r["time_s"]) for r in system]
    fig, (pct, mem) = plt.subplots(1, 2, figsize=(11, 3.6))
    for key, label in (("cpu_percent", "CPU (mean of cores)"), ("cpu_max_core_percent", "busiest core"),
                       ("gpu_percent", "GPU")):
        values = [r.get(key) or "" for r in system]
        if any(values):
            pct.plot(t, [float(v) if v else float("nan") for v in values], lw=1, label=label)
    _axes(pct, "Utilization", "seconds since start", "%")
    pct.set_ylim(0, 102)
    pct.legend(fontsize=8)
    mem.plot(t, [float(r["process_rss_gb"]) for r in system], lw=1, label="job RSS (GiB, with workers)")
    gpu_mem = [r.get("gpu_memory_gb") or "" for r in system]
    if any(gpu_mem):
        mem.plot(t, [float(v) if v else float("nan") for v in gpu_mem], lw=1, label="GPU memory (GiB)")
    _axes(mem, "Memory", "seconds since start", "GiB")
    mem.legend(fontsize=8)
    return _uri(fig)


def data_wait(steps: list[dict[str, str]]) -> str:
    per_epoch: dict[int, list[float]] = defaultdict(lambda: [0.0, 0.0, 0.0])
    for r in steps:
        e = per_epoch[int(r["epoch"])]
        e[0] += float(r["data_wait_s"])
        e[1] += float(r["compute_s"])
        e[2] += float(r["images"])
    epochs = sorted(per_epoch)
    wait = [per_epoch[e][0] for e in epochs]
    compute = [per_epoch[e][1] for e in epochs]
    fig, (bars, rate) = plt.subplots(1, 2, figsize=(11, 3.4))
    bars.bar(epochs, compute, label="computing")
    bars.bar(epochs, wait, bottom=compute, label="waiting for data")
    _axes(bars, "Where each epoch's step time went", "epoch", "seconds")
    bars.legend(fontsize=8)
    rate.plot(epochs, [per_epoch[e][2] / max(w + c, 1e-9) for e, w, c in zip(epochs, wait, compute, strict=True)],
              marker="o")
    _axes(rate, "Images per second (training steps)", "epoch", "images/s")
    return _uri(fig)


def confusion(names: list[str], matrix: list[list[int]], channel: str) -> str:
    n = len(names)
    size = min(12, 3 + 0.45 * n)
    fig, ax = plt.subplots(figsize=(size + 1.5, size))
    rates = [[v / max(sum(row), 1) for v in row] for row in matrix]
    image = ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, fraction=0.046, label="share of the true class")
    if n <= MANY:
        ax.set_xticks(range(n), names, rotation=60, ha="right", fontsize=8)
        ax.set_yticks(range(n), names, fontsize=8)
    if n <= 15:
        for i, row in enumerate(matrix):
            for j, v in enumerate(row):
                if v:
                    ax.text(j, i, str(v), ha="center", va="center", fontsize=8,
                            color="white" if rates[i][j] > 0.6 else "black")
    ax.set(title=f"Confusion matrix ({channel}); rows: true class", xlabel="predicted", ylabel="true")
    return _uri(fig)


def per_class_accuracy(accuracy: dict[str, float], train_counts: dict[str, int]) -> str:
    names = sorted(accuracy)
    fig, ax = plt.subplots(figsize=(7, 4))
    x = [train_counts.get(c, 0) for c in names]
    y = [accuracy[c] for c in names]
    ax.scatter(x, y)
    if len(names) <= MANY:
        for c, xi, yi in zip(names, x, y, strict=True):
            ax.annotate(c, (xi, yi), fontsize=8, xytext=(3, 3), textcoords="offset points")
    _axes(ax, "Per-class accuracy against training images", "training images of the class", "accuracy")
    ax.set_ylim(-0.02, 1.05)
    return _uri(fig)


def class_distribution(counts: dict[str, dict[str, int]]) -> str:
    channels = list(counts)
    names = sorted({c for per in counts.values() for c in per})
    width = 0.8 / max(len(channels), 1)
    fig, ax = plt.subplots(figsize=(min(14, 4 + 0.35 * len(names)), 3.8))
    for i, channel in enumerate(channels):
        ax.bar([k + i * width for k in range(len(names))], [counts[channel].get(c, 0) for c in names], width,
               label=channel)
    if len(names) <= MANY:
        ax.set_xticks([k + 0.4 - width / 2 for k in range(len(names))], names, rotation=45, ha="right", fontsize=8)
    _axes(ax, "Images per class in each channel", "class", "images")
    ax.legend(fontsize=8)
    return _uri(fig)
