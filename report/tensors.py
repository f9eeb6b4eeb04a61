"""A run's smdebug output, read with smdebug's own trial API: batch losses, gradient norms by layer group.

Steps here are smdebug's global steps (train and eval steps counted together); `train_step` turns
one into the training step counted from 1, the unit the report and the profile use.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# smdebug logs each file it reads at INFO, and sleeps a second before its last refresh of a finished run.
os.environ.setdefault("SMDEBUG_LOG_LEVEL", "error")
os.environ.setdefault("SMDEBUG_TRAINING_END_DELAY_REFRESH", "0")

GRADIENT_PREFIX = "gradient/"


def open_trial(path: Path):
    """The trial at `path`, or None when there is no smdebug output there.

    A run that stopped without closing its hook has no end marker, and smdebug would wait for
    more steps forever; the report treats what is on disk as all there is.
    """
    if not (path / "collections").is_dir() or not any((path / "collections").rglob("*collections.json")):
        return None
    from smdebug.trials import create_trial

    _stats.clear()
    _saved.clear()
    trial = create_trial(str(path))
    trial.maybe_refresh()
    if not trial.loaded_all_steps:
        trial.loaded_all_steps = True
        steps = trial.steps()
        trial.last_complete_step = steps[-1] if steps else -1
    trial.dynamic_refresh = False
    return trial


def train_mode():
    from smdebug import modes

    return modes.TRAIN


def train_step(trial, global_step: int) -> int | None:
    """The training step (from 1) of a global step, or None for an eval step."""
    mode, mode_step = trial.mode_modestep(global_step)
    return mode_step + 1 if mode == train_mode() else None


def epoch_of(trial, global_step: int) -> int:
    """The epoch of an evaluation step: the hook saves the epoch scalars once per epoch, after its evaluation."""
    saves = trial.tensor("scalar/train_loss").steps() if "scalar/train_loss" in trial.tensor_names() else []
    return 1 + sum(1 for s in saves if s < global_step)


def value(trial, name: str, global_step: int) -> np.ndarray:
    return np.asarray(trial.tensor(name).value(global_step), dtype=np.float32)


@dataclass(frozen=True)
class Stats:
    mean: float
    mean_abs: float
    sum_squares: float
    variance: float
    finite: bool
    has_nan: bool


_stats: dict[tuple[str, str, int], Stats] = {}
_saved: dict[tuple[str, str], frozenset[int]] = {}


def saved(trial, name: str, global_step: int) -> bool:
    """Whether `name` was saved at that step; each tensor's steps are listed once per report."""
    key = (trial.path, name)
    if key not in _saved:
        _saved[key] = frozenset(trial.tensor(name).steps())
    return global_step in _saved[key]


def stats(trial, name: str, global_step: int) -> Stats:
    """What the rules and charts need from one saved tensor; each tensor is read once per report."""
    key = (trial.path, name, global_step)
    if key not in _stats:
        v = value(trial, name, global_step)
        finite = bool(np.isfinite(v).all())
        f64 = np.float64  # accumulate in double precision without copying the tensor to it
        _stats[key] = Stats(float(v.mean(dtype=f64)), float(np.abs(v).mean(dtype=f64)),
                            float(np.dot(v.ravel(), v.ravel())) if finite else float("inf"),
                            float(v.var(dtype=f64)) if finite else float("nan"), finite, bool(np.isnan(v).any()))
    return _stats[key]


def loss_names(trial) -> list[str]:
    return sorted(trial.tensor_names(collection="losses")) if "losses" in trial.collections() else []


def batch_losses(trial) -> list[tuple[int, float]]:
    """(training step, loss) for every saved training step of the first loss tensor."""
    names = loss_names(trial)
    if not names:
        return []
    tensor = trial.tensor(names[0])
    out = []
    for step in tensor.steps():
        t = train_step(trial, step)
        if t is not None:
            out.append((t, stats(trial, names[0], step).mean))
    return out


def layer_group(parameter: str) -> str:
    """'ResNet_layer3.1.conv2.weight' -> 'layer3'; the stem's conv1/bn1 -> 'stem'; fc -> 'head (fc)'."""
    name = re.sub(r"^[A-Za-z0-9]+_", "", parameter.removeprefix(GRADIENT_PREFIX), count=1)
    first = name.split(".", 1)[0]
    if first.startswith("layer"):
        return first
    return "head (fc)" if first == "fc" else "stem"


def gradient_names(trial) -> list[str]:
    return sorted(n for n in trial.tensor_names() if n.startswith(GRADIENT_PREFIX))


def gradient_norms(trial) -> dict[str, list[tuple[int, float]]]:
    """Per layer group, (training step, L2 norm of all its gradients) for each saved training step."""
    per_step: dict[str, dict[int, float]] = {}
    for name in gradient_names(trial):
        group = layer_group(name)
        for step in trial.tensor(name).steps():
            t = train_step(trial, step)
            if t is not None:
                sq = stats(trial, name, step).sum_squares
                per_step.setdefault(group, {})[t] = per_step.get(group, {}).get(t, 0.0) + sq
    return {g: [(t, math.sqrt(v)) for t, v in sorted(steps.items())] for g, steps in sorted(per_step.items())}
