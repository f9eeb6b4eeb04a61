"""Rules over a run's profile (output data dir, `profile/`): what slowed training, and what to change.

Each rule returns a Verdict: whether it fired, a sentence a person can act on, and the first
training step where the condition held. The report (launch.py) shows them next to smdebug's rules.
"""

from __future__ import annotations

import csv
import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path

DATA_WAIT_LIMIT = 0.2       # share of a step spent waiting for the batch
GPU_BUSY_LIMIT = 70.0       # median GPU utilization, percent
HEADROOM_LOW = 0.4          # peak GPU memory below this share of the GPU: the batch could grow
HEADROOM_HIGH = 0.92        # above this share (GPU or host): one larger batch or image away from OOM


@dataclass(frozen=True)
class Verdict:
    """A rule's answer. step: the training step (from 1) where it first held; epoch, for epoch-level rules."""

    rule: str
    fired: bool
    message: str
    step: int | None = None
    epoch: int | None = None
    evaluated: bool = True      # False: the run recorded nothing this rule could look at

    @property
    def where(self) -> str:
        return f"epoch {self.epoch}" if self.epoch else f"step {self.step}" if self.step else ""


def read_csv(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _steady(rows: list[dict[str, str]]) -> list[dict[str, str]]:
    """Steps without each epoch's first, where workers start and caches fill."""
    return [r for r in rows if r.get("step") != "0"] or rows


def data_wait(steps: list[dict[str, str]], workers: int, cpus: int) -> Verdict:
    rows = _steady(steps)
    if not rows:
        return Verdict("DataLoaderWait", False, "no step timings recorded", evaluated=False)
    wait = sum(float(r["data_wait_s"]) for r in rows)
    total = wait + sum(float(r["compute_s"]) for r in rows)
    share = wait / total if total else 0.0
    if share <= DATA_WAIT_LIMIT:
        return Verdict("DataLoaderWait", False, f"data loading takes {share:.0%} of each step")
    first = next((i + 1 for i, r in enumerate(steps)
                  if float(r["data_wait_s"]) > DATA_WAIT_LIMIT * (float(r["data_wait_s"]) + float(r["compute_s"]))),
                 None)
    if workers < cpus:
        advice = f"raise num-workers to {min(cpus, max(workers * 2, workers + 1))} ({cpus} CPUs available)"
    else:
        advice = ("every CPU already runs a worker: use an instance with more CPUs per GPU, smaller stored "
                  "images, or augment=light")
    return Verdict("DataLoaderWait", True, f"data loading takes {share:.0%} of each step: {advice}", first)


def gpu_utilization(system: list[dict[str, str]]) -> Verdict:
    gpu = [float(r["gpu_percent"]) for r in system if r.get("gpu_percent")]
    if not gpu:
        return Verdict("LowGPUUtilization", False, "no GPU utilization recorded (CPU run, or no NVML)",
                       evaluated=False)
    median = statistics.median(gpu)
    if median >= GPU_BUSY_LIMIT:
        return Verdict("LowGPUUtilization", False, f"the GPU is busy {median:.0f}% of the time (median)")
    return Verdict("LowGPUUtilization", True,
                   f"the GPU is busy only {median:.0f}% of the time (median): check the data-loader wait first, "
                   "then raise batch-size")


def workers_vs_cpus(workers: int, cpus: int) -> Verdict:
    if workers > cpus:
        return Verdict("WorkersVsCPUs", True, f"{workers} data-loader workers on {cpus} CPUs fight for cores: "
                                              f"set num-workers to {cpus} or fewer")
    return Verdict("WorkersVsCPUs", False, f"{workers} data-loader workers on {cpus} CPUs")


def batch_size_headroom(run: dict) -> Verdict:
    """Peak memory against capacity (run.json): room to raise the batch on a GPU, or too little room."""
    batch, total, peak = run.get("batch_size"), run.get("memory_total_gb"), run.get("memory_peak_gb")
    if not (batch and total and peak):
        return Verdict("BatchSize", False, "no memory figures recorded (profile/run.json)", evaluated=False)
    share = peak / total
    where = "the GPU's" if run.get("memory_kind") == "gpu" else "the instance's"
    used = f"batch-size {batch} peaks at {peak:.1f} GiB, {share:.0%} of {where} {total:.0f} GiB"
    if share > HEADROOM_HIGH:
        return Verdict("BatchSize", True, f"{used}: one larger image or batch from running out of memory; "
                                          f"lower batch-size to {max(1, batch // 2)} or image-size")
    if run.get("memory_kind") == "gpu" and share < HEADROOM_LOW:
        factor = min(8, 2 ** int(math.log2(0.8 / share)))
        return Verdict("BatchSize", True, f"{used}: raise batch-size to {batch * factor} to use the GPU "
                                          f"(scale lr by about {factor}x, keep warmup-epochs)")
    if run.get("memory_kind") != "gpu":
        used += " (on a CPU, step time rather than memory bounds the batch)"
    return Verdict("BatchSize", False, used)


def read_run(profile_dir: Path) -> dict:
    try:
        return json.loads((profile_dir / "run.json").read_text())
    except (OSError, ValueError):
        return {}


def evaluate(profile_dir: Path, workers: int | None = None, cpus: int | None = None) -> list[Verdict]:
    """Every profiling rule; workers and CPUs default to what the run recorded in run.json."""
    run = read_run(profile_dir)
    workers = run.get("workers", 0) if workers is None else workers
    cpus = run.get("cpus", 1) if cpus is None else cpus
    steps = read_csv(profile_dir / "steps.csv")
    system = read_csv(profile_dir / "system.csv")
    return [data_wait(steps, workers, cpus), gpu_utilization(system), batch_size_headroom(run),
            workers_vs_cpus(workers, cpus)]
