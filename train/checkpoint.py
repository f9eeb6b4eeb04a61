"""Epoch-end checkpoints that a restarted job (spot interruption) resumes from exactly.

The checkpoint holds everything the rest of the run depends on: weights, optimizer, schedule,
scaler, RNG states, the best weights so far, early-stopping state and the metric history.
It is written atomically, so a kill mid-write leaves the previous checkpoint intact.

A job writes it in a thread of its own while the next epoch trains (Writer): writing resnet18's
(179 MB: weights, AdamW's state, the best weights) took 0.28-0.57 s on 2 AMX cores, a sixth of one
of `make demo`'s epochs, and on a GPU the device waits for all of it. The epoch's end only copies
the state (0.05 s there; resnet50's 377 MB 0.10 s against 0.63 s for the write). Without the zip
archive's CRC-32s: torch.load does not check them (a byte flipped in a tensor loads silently with
or without), and they were half of torch.save's time.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import random
import threading
from pathlib import Path

import numpy as np
import torch

from imgcls.artifact import AtomicFile
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


def remove_partial_writes(directory: Path) -> list[Path]:
    """Delete what writes cut short by a kill left behind (AtomicFile's temporary files, one per
    interruption mid-write, as large as a checkpoint). SageMaker restores the folder from S3 at each
    start and mirrors deletions to S3, so each one would otherwise be downloaded by every restart."""
    removed, size = AtomicFile.leftovers(Path(directory) / FILENAME), 0
    for path in removed:
        size += path.stat().st_size
        path.unlink()
    if removed:
        log.info("removed %d unfinished checkpoint write(s) left by an interrupted run (%.0f MB): %s",
                 len(removed), size / 1e6, ", ".join(p.name for p in removed))
    return removed


def save(directory: Path, state: dict) -> Path:
    """Write the checkpoint now (Writer, waited for)."""
    writer = Writer(directory)
    writer.save(state)
    writer.close()
    return writer.path


class Writer:
    """Writes checkpoints in a thread of its own, one at a time: save() copies the state to the
    CPU and returns while the thread writes it; the next save() and close() wait for that write
    and raise its error. A folder that cannot take the file fails in save() itself. Nothing else
    may torch.save while a write is in flight (it runs without CRC-32s, a process-wide option):
    close() before writing the artifact."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self.path = self.directory / FILENAME
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def save(self, state: dict) -> None:
        self.close()
        snapshot = _copied(state)  # the next steps change the weights and the optimizer's state in place
        try:
            target = AtomicFile(self.path)
        except OSError as exc:
            raise _unwritable(self.directory, exc) from None
        self._thread = threading.Thread(target=self._write, args=(target, snapshot), name="checkpoint-writer")
        self._thread.start()

    def _write(self, target: AtomicFile, snapshot: dict) -> None:
        try:
            with _without_crc32():
                target.write(lambda fh: torch.save(snapshot, fh))
        except BaseException as exc:  # handed to the training thread by close()
            self._error = exc

    def close(self) -> None:
        """Wait for the write in flight; raise its error."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        exc, self._error = self._error, None
        if isinstance(exc, OSError):
            raise _unwritable(self.directory, exc) from None
        if exc is not None:
            raise exc


def _unwritable(directory: Path, exc: OSError) -> CheckpointError:
    return CheckpointError(f"The checkpoint cannot be written to {directory} ({exc.strerror or exc}): it must be "
                           "a writable folder (the Estimator's checkpoint_local_path, /opt/ml/checkpoints by "
                           "default).")


def _copied(obj):
    """obj with every tensor copied to the CPU (a device's too) and every container copied."""
    if torch.is_tensor(obj):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        out = copy.copy(obj)  # keeps a state dict's class and its _metadata (module versions)
        for k, v in obj.items():
            out[k] = _copied(v)
        return out
    if type(obj) in (list, tuple):  # a named tuple's fields go through deepcopy below
        return type(obj)(_copied(v) for v in obj)
    return copy.deepcopy(obj)


@contextlib.contextmanager
def _without_crc32():
    before = torch.serialization.get_crc32_options()
    torch.serialization.set_crc32_options(False)
    try:
        yield
    finally:
        torch.serialization.set_crc32_options(before)


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
