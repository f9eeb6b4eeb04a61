"""Epoch-end checkpoints that a restarted job (spot interruption) resumes from exactly.

The checkpoint holds everything the rest of the run depends on: weights, optimizer, schedule,
scaler, RNG states, the best weights so far, early-stopping state and the metric history.
It is written atomically, so a kill mid-write leaves the previous checkpoint intact.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path

import numpy as np
import torch

from imgcls.artifact import atomic_write_bytes
from imgcls.errors import ClassifierError

log = logging.getLogger("train")

FILENAME = "checkpoint.pt"
# Hyperparameters that may change between a run and its resumption without changing its meaning.
# processes-per-host (with the instance count) sets the world size: a job resumes with any.
RESUMABLE_CHANGES = {"epochs", "patience", "num-workers", "eval-batch-size", "profile-interval-ms", "profile-steps",
                     "cache-images", "compile", "gpu-decode", "processes-per-host", "int8",
                     "conv-gemm", "frozen-trunk", "fused-norm"}  # kernels only: checkpoints from before them resume too


class CheckpointError(ClassifierError):
    """A checkpoint exists but cannot be resumed from."""


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(directory: Path, state: dict) -> Path:
    path = Path(directory) / FILENAME
    try:
        atomic_write_bytes(path, lambda fh: torch.save(state, fh))
    except OSError as exc:
        raise CheckpointError(f"The checkpoint cannot be written to {directory} ({exc.strerror or exc}): it must be "
                              "a writable folder (the Estimator's checkpoint_local_path, /opt/ml/checkpoints by "
                              "default).") from None
    return path


def load(directory: Path, hyperparameters: dict) -> dict | None:
    """The last checkpoint, or None. Refuses one written with other hyperparameters."""
    path = Path(directory) / FILENAME
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # a damaged file: say so rather than train from scratch silently
        raise CheckpointError(f"The checkpoint {path} cannot be read ({type(exc).__name__}: {exc}): delete it "
                              "to start over, or use a fresh checkpoint_s3_uri.") from None
    before = state.get("hyperparameters", {})
    changed = sorted(k for k in set(before) | set(hyperparameters)
                     if k not in RESUMABLE_CHANGES and before.get(k) != hyperparameters.get(k))
    if changed:
        detail = ", ".join(f"{k}: {before.get(k)!r} -> {hyperparameters.get(k)!r}" for k in changed[:5])
        raise CheckpointError(f"The checkpoint in {directory} was written with other hyperparameters ({detail}): "
                              "give each job its own checkpoint_s3_uri, or delete the checkpoint to start over.")
    return state
