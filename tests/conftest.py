"""Test helpers: /opt/ml-shaped job folders run through the real `train` toolkit entry."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from train.synthetic import make_dataset

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

# Small enough for 2 CPU cores: 3 classes of 32x32 images, resnet18, two epochs.
TINY = {"arch": "resnet18", "weights": "none", "epochs": "2", "batch-size": "8", "image-size": "32",
        "num-workers": "0", "seed": "3", "top-k": "2", "lr": "0.01",
        # Every eligible convolution as a multiply: the jobs run that path, and runs that are compared
        # to the bit use the same kernels (auto times them anew each run).
        "conv-gemm": "true"}


@dataclass
class Job:
    base: Path

    @property
    def config(self) -> Path:
        return self.base / "input" / "config"

    @property
    def data(self) -> Path:
        return self.base / "input" / "data"

    @property
    def model_dir(self) -> Path:
        return self.base / "model"

    @property
    def output_data(self) -> Path:
        return self.base / "output" / "data"

    @property
    def failure(self) -> Path:
        return self.base / "output" / "failure"

    def hyperparameters(self, **overrides) -> None:
        hps = {**TINY, **{k.replace("_", "-"): str(v) for k, v in overrides.items()}}
        (self.config / "hyperparameters.json").write_text(json.dumps(hps))

    def set_raw_hyperparameters(self, hps: dict) -> None:
        (self.config / "hyperparameters.json").write_text(json.dumps(hps))

    def write_channels_config(self) -> None:
        channels = sorted(p.name for p in self.data.iterdir() if p.is_dir()) if self.data.is_dir() else []
        spec = {"TrainingInputMode": "File", "S3DistributionType": "FullyReplicated", "RecordWrapperType": "None"}
        (self.config / "inputdataconfig.json").write_text(json.dumps({c: spec for c in channels}))

    def env(self, **extra) -> dict:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SM_")}
        env.update(SAGEMAKER_BASE_DIR=str(self.base), SAGEMAKER_PROGRAM="train_job.py", SM_STUDIO_LOCAL_MODE="true",
                   PYTHONPATH=str(ROOT), TORCH_HOME=str(self.base / "torch_home"), OMP_NUM_THREADS="2")
        env.update(extra)
        return env

    def start(self, **env) -> subprocess.Popen:
        """Start `train` the way the image does (program copied into <base>/code)."""
        self.write_channels_config()
        (self.base / "code").mkdir(exist_ok=True)
        shutil.copy(ROOT / "train" / "entry" / "train_job.py", self.base / "code")
        return subprocess.Popen([str(BIN / "train")], cwd=self.base, env=self.env(**env), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)

    def run(self, timeout: float = 300, **env) -> subprocess.CompletedProcess:
        proc = self.start(**env)
        out, _ = proc.communicate(timeout=timeout)
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, "")


@pytest.fixture
def job(tmp_path) -> Job:
    base = tmp_path / "opt_ml"
    j = Job(base)
    j.config.mkdir(parents=True)
    (j.config / "resourceconfig.json").write_text(json.dumps({"current_host": "algo-1", "hosts": ["algo-1"]}))
    j.hyperparameters()
    return j


@pytest.fixture
def tiny_data(job) -> Job:
    """3 classes x 10 train images (and 3 test images each), 32x32 JPEG."""
    make_dataset(job.data, per_class=10, size=32, classes=3, test_per_class=3, seed=1)
    return job


COLOURS = {"red": (200, 40, 40), "green": (40, 180, 60), "blue": (50, 60, 200)}


def colour_dataset(root: Path, per_class: int = 24, test_per_class: int = 4, seed: int = 0) -> None:
    """Noisy flat colours, 32x32: a task a small ResNet learns cleanly in a few epochs (a good run)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)  # seeded noise: the same files, so the same run, every time
    for split, n in (("train", per_class), ("test", test_per_class)):
        for name, rgb in COLOURS.items():
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(n):
                tint = np.array(rgb) + rng.integers(-40, 41, size=3)
                pixels = 0.7 * tint + 0.3 * rng.normal(128, 40, size=(32, 32, 3))
                Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(folder / f"{i}.jpg")


ALL_COLLECTIONS = [{"CollectionName": "losses"}, {"CollectionName": "gradients"},
                   {"CollectionName": "relu_input", "CollectionParameters": {"include_regex": ".*relu_input"}}]


def write_debughookconfig(config: Path, local_path: str, save_interval: int = 1,
                          collections: list[dict] = ALL_COLLECTIONS) -> None:
    """A DebuggerHookConfig as SageMaker writes it into /opt/ml/input/config."""
    (config / "debughookconfig.json").write_text(json.dumps({
        "LocalPath": local_path, "HookParameters": {"save_interval": str(save_interval)},
        "CollectionConfigurations": collections}))


def debugger_config(job: Job, save_interval: int = 1) -> Path:
    """The debugger on for a job, saving losses, gradients and relu_input to <base>/output/tensors."""
    tensors = job.base / "output" / "tensors"
    write_debughookconfig(job.config, str(tensors), save_interval)
    return tensors


def train_run(base: Path, hps: dict, zero_weights: bool = False, hook: bool = True, per_class: int = 24) -> Job:
    """A finished real `train` job on the colour dataset, with the debugger hook on unless hook=False;
    zero_weights starts it from an all-zero state dict in the 'pretrained' channel."""
    import torch
    import torchvision

    job = Job(base)
    job.config.mkdir(parents=True)
    (job.config / "resourceconfig.json").write_text(json.dumps({"current_host": "algo-1", "hosts": ["algo-1"]}))
    job.hyperparameters(**hps)
    colour_dataset(job.data, per_class=per_class)
    if zero_weights:
        state = torchvision.models.resnet18(num_classes=len(COLOURS)).state_dict()
        (job.data / "pretrained").mkdir()
        torch.save({k: torch.zeros_like(v) if v.is_floating_point() else v for k, v in state.items()},
                   job.data / "pretrained" / "zeros.pt")
    if hook:
        debugger_config(job)
    result = job.run()
    assert result.returncode == 0, result.stdout[-3000:]
    return job


# (stage, seconds) recorded by the long container tests, printed at the end of the run.
stage_times: list[tuple[str, float]] = []


def pytest_terminal_summary(terminalreporter):
    if stage_times:
        terminalreporter.section("container stages")
        for stage, seconds in stage_times:
            terminalreporter.write_line(f"{seconds:8.1f} s  {stage}" if seconds else f"           {stage}")


def wait_http(url: str, timeout: float = 60) -> None:
    """Until `url` answers (any status but a refused connection)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(url, timeout=2).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                pytest.fail(f"{url} did not answer in {timeout:.0f} s")
            time.sleep(0.2)


@contextlib.contextmanager
def moto_server():
    """A real moto_server on a free loopback port; yields its URL (for AWS_ENDPOINT_URL)."""
    from serve.process import free_port
    port = free_port()
    proc = subprocess.Popen([str(BIN / "moto_server"), "-p", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        wait_http(f"http://127.0.0.1:{port}/moto-api/")
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=30)
