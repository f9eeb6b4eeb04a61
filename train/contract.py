"""The SageMaker training contract, read in one place.

The `sagemaker-training` toolkit turns /opt/ml/input/config/*.json into SM_* variables before it
starts our program; this module reads them (falling back to the /opt/ml layout under
SAGEMAKER_BASE_DIR) and hands plain values inward. Nothing else in the trainer reads os.environ.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from imgcls.errors import ClassifierError

# Users name channels several ways; the trainer sees these three (plus 'pretrained').
CHANNEL_ALIASES = {"train": "train", "training": "train", "valid": "valid", "validation": "valid",
                   "val": "valid", "test": "test", "testing": "test", "pretrained": "pretrained"}


class ContractError(ClassifierError):
    """The job was started without something it needs (a channel, a config file)."""


@dataclass
class Job:
    hyperparameters: dict[str, str]
    channels: dict[str, Path]
    model_dir: Path
    output_dir: Path
    output_data_dir: Path
    checkpoint_dir: Path
    debugger_config: Path | None
    hosts: list[str] = field(default_factory=lambda: ["algo-1"])
    current_host: str = "algo-1"
    num_gpus: int = 0
    num_cpus: int = 1
    ignored_channels: list[str] = field(default_factory=list)
    profiler_config: Path | None = None

    @property
    def failure_file(self) -> Path:
        return self.output_dir / "failure"


def base_dir(environ=os.environ) -> Path:
    return Path(environ.get("SAGEMAKER_BASE_DIR", "/opt/ml"))


def _json_env(environ, name, default):
    raw = environ.get(name)
    if raw is None:
        return default
    try:
        return json.loads(raw)
    except ValueError:
        return default


def read_job(environ=os.environ) -> Job:
    base = base_dir(environ)
    config_dir = Path(environ.get("SM_INPUT_CONFIG_DIR", base / "input" / "config"))
    # The toolkit json-decodes values ("0.1" -> 0.1, "true" -> True); our parser wants the strings back.
    hps = _json_env(environ, "SM_HPS", None)
    if hps is None:
        path = config_dir / "hyperparameters.json"
        hps = json.loads(path.read_text()) if path.is_file() else {}
    hyperparameters = {k: v if isinstance(v, str) else json.dumps(v) for k, v in hps.items()}

    data_dir = Path(environ.get("SM_INPUT_DIR", base / "input")) / "data"
    names = _json_env(environ, "SM_CHANNELS", None)
    if names is None:
        names = sorted(p.name for p in data_dir.iterdir() if p.is_dir()) if data_dir.is_dir() else []
    channels, ignored = {}, []
    for name in names:
        path = Path(environ.get(f"SM_CHANNEL_{name.upper()}", data_dir / name))
        canonical = CHANNEL_ALIASES.get(name.lower())
        if canonical is None:
            ignored.append(name)
        elif canonical in channels:
            raise ContractError(f"Channels '{name}' and another one both mean '{canonical}': pass only one.")
        else:
            channels[canonical] = path

    debugger = config_dir / "debughookconfig.json"
    profiler = config_dir / "profilerconfig.json"
    resource = _json_env(environ, "SM_RESOURCE_CONFIG", {}) or {}
    hosts = _json_env(environ, "SM_HOSTS", None) or resource.get("hosts") or ["algo-1"]
    return Job(
        hyperparameters=hyperparameters,
        channels=channels,
        model_dir=Path(environ.get("SM_MODEL_DIR", base / "model")),
        output_dir=Path(environ.get("SM_OUTPUT_DIR", base / "output")),
        output_data_dir=Path(environ.get("SM_OUTPUT_DATA_DIR", base / "output" / "data")),
        checkpoint_dir=Path(environ.get("SM_CHECKPOINT_DIR", base / "checkpoints")),
        debugger_config=debugger if debugger.is_file() else None,
        profiler_config=profiler if profiler.is_file() else None,
        hosts=list(hosts),
        current_host=environ.get("SM_CURRENT_HOST", resource.get("current_host", hosts[0])),
        num_gpus=int(environ.get("SM_NUM_GPUS", 0) or 0),
        num_cpus=int(environ.get("SM_NUM_CPUS", os.cpu_count() or 1) or 1),
        ignored_channels=ignored,
    )
