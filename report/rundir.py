"""Finding a run's files in a folder: a local /opt/ml-shaped run, an output data dir, or a download.

Accepted layouts (the first that holds metrics.json wins):
    FOLDER/                 the output data dir itself (metrics.json, profile/, confusion_matrix.csv)
    FOLDER/output/data/     a local run's base dir (local_test/test_dir), or `launch.py report JOB`'s download
    FOLDER/data/            an extracted output.tar.gz's parent
Debugger tensors: --tensors, else FOLDER/debug-output, FOLDER/output/tensors or FOLDER/tensors.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path

from imgcls.errors import ClassifierError

TENSOR_DIRS = ("debug-output", "output/tensors", "tensors")


class ReportError(ClassifierError):
    """The folder is not a run the report can read; the message says what to pass instead."""


@dataclass
class Run:
    name: str
    output_data: Path
    tensors: Path | None
    history: list[dict]
    final: dict
    best_epoch: int | None
    per_class_accuracy: dict[str, float]
    confusion_channel: str
    class_counts: dict[str, dict[str, int]] = field(default_factory=dict)
    confusion: tuple[list[str], list[list[int]]] | None = None
    hyperparameters: dict[str, str] = field(default_factory=dict)
    failure: str = ""

    @property
    def profile(self) -> Path:
        return self.output_data / "profile"

    @property
    def train_counts(self) -> dict[str, int]:
        return self.class_counts.get("train", {})


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise ReportError(f"{path} cannot be read ({exc}): is the run's output complete?") from None


def read_confusion(path: Path) -> tuple[list[str], list[list[int]]] | None:
    if not path.is_file():
        return None
    with open(path, newline="") as fh:
        rows = list(csv.reader(fh))
    return rows[0][1:], [[int(v) for v in row[1:]] for row in rows[1:]]


def find_output_data(folder: Path) -> Path:
    for candidate in (folder, folder / "output" / "data", folder / "data"):
        if (candidate / "metrics.json").is_file():
            return candidate
    raise ReportError(f"no metrics.json in {folder}, {folder / 'output' / 'data'} or {folder / 'data'}: pass a "
                      "local run's base folder (the one holding input/ and output/), its output/data folder, or "
                      "a SageMaker training job's name")


def find_tensors(folder: Path, output_data: Path) -> Path | None:
    for candidate in [folder / d for d in TENSOR_DIRS] + [output_data.parent / "tensors"]:
        if (candidate / "collections").is_dir():
            return candidate
    return None


def load(folder: Path, tensors: Path | None = None, name: str | None = None) -> Run:
    folder = Path(folder)
    if not folder.is_dir():
        raise ReportError(f"{folder} is not a folder: pass a local run's folder or a SageMaker training job's name")
    output_data = find_output_data(folder)
    if tensors is not None and not (Path(tensors) / "collections").is_dir():
        raise ReportError(f"--tensors {tensors} holds no smdebug output (no collections/ folder in it)")
    metrics = _read_json(output_data / "metrics.json") or {}
    hps = (_read_json(folder / "input" / "config" / "hyperparameters.json")
           or _read_json(folder / "hyperparameters.json")
           or (_read_json(folder / "model" / "model.json") or {}).get("hyperparameters") or {})
    failure_file = next((p for p in (folder / "output" / "failure", folder / "failure") if p.is_file()), None)
    return Run(
        name=name or folder.resolve().name,
        output_data=output_data,
        tensors=Path(tensors) if tensors is not None else find_tensors(folder, output_data),
        history=metrics.get("history", []),
        final=metrics.get("final", {}),
        best_epoch=metrics.get("best_epoch"),
        per_class_accuracy=metrics.get("per_class_accuracy", {}),
        confusion_channel=metrics.get("confusion_channel", "valid"),
        class_counts=_read_json(output_data / "class_counts.json") or {},
        confusion=read_confusion(output_data / "confusion_matrix.csv"),
        hyperparameters={str(k): str(v) for k, v in hps.items()},
        failure=failure_file.read_text(errors="replace").strip() if failure_file else "",
    )
