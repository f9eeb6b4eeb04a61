"""Rules over a run's profile (output data dir, `profile/`): what slowed training, and what to change.

Each rule returns a Verdict: whether it fired, a sentence a person can act on, and the first
training step where the condition held. The report (launch.py) shows them next to smdebug's rules.
"""

from __future__ import annotations

import csv
import statistics
from dataclasses import dataclass
from pathlib import Path

DATA_WAIT_LIMIT = 0.2       # share of a step spent waiting for the batch
GPU_BUSY_LIMIT = 70.0       # median GPU utilization, percent


@dataclass(frozen=True)
class Verdict:
    rule: str
    fired: bool
    message: str
    step: int | None = None


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
        return Verdict("DataLoaderWait", False, "no step timings recorded")
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
        return Verdict("LowGPUUtilization", False, "no GPU utilization recorded (CPU run, or no NVML)")
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


def evaluate(profile_dir: Path, workers: int, cpus: int) -> list[Verdict]:
    steps = read_csv(profile_dir / "steps.csv")
    system = read_csv(profile_dir / "system.csv")
    return [data_wait(steps, workers, cpus), gpu_utilization(system), workers_vs_cpus(workers, cpus)]
