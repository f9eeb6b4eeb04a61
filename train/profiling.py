"""Where each training step's time goes, and how busy the machine is, in the output data dir.

    profile/steps.csv    one row per training step: epoch, step, data_wait_s, compute_s, images
    profile/system.csv   every interval: CPU (mean and busiest core), memory, this job's RSS, GPU
                         utilization and memory (NVML, when there is a GPU and pynvml); seconds
                         count from the start of each run of the program (a resumed job restarts them)
    profile/run.json     what the rules need besides timings: workers, CPUs, batch size, device,
                         memory capacity and the peak this run used
    profile/trace/       a torch.profiler trace of a window of steps, when asked for (TensorBoard's
                         profiler plugin or Perfetto open it)

smdebug's framework profiler is deprecated for PyTorch 2; these files carry what our users read
from it. The interval and the trace window come from the job's ProfilerConfig
(profilerconfig.json) or from the `profile-interval-ms` and `profile-steps` hyperparameters.
On a GPU, compute_s is the host's view of a step (kernels run asynchronously); the epoch's
images per second, measured after a synchronize, is exact.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch

log = logging.getLogger("train")


@dataclass(frozen=True)
class ProfileSettings:
    interval_ms: int = 500          # 0: no system monitor
    trace_start: int = 0            # first step of the trace window (counted from 1); 0: no trace
    trace_steps: int = 0

    @classmethod
    def resolve(cls, interval_ms: int, steps: str, profiler_config: Path | None) -> ProfileSettings:
        """Hyperparameters, overridden by what a ProfilerConfig asks for."""
        start, count = parse_steps(steps)
        if profiler_config is not None:
            try:
                cfg = json.loads(profiler_config.read_text())
            except (OSError, ValueError) as exc:
                log.warning("profiler: %s unreadable (%s), using the hyperparameters", profiler_config, exc)
                cfg = {}
            interval_ms = int(cfg.get("ProfilingIntervalInMilliseconds", interval_ms) or interval_ms)
            detailed = (cfg.get("ProfilingParameters") or {}).get("DetailedProfilingConfig")
            if detailed:
                try:
                    window = json.loads(detailed) if isinstance(detailed, str) else detailed
                    start, count = int(window.get("StartStep", 0)) + 1, int(window.get("NumSteps", 1))
                except (ValueError, TypeError, AttributeError):
                    log.warning("profiler: DetailedProfilingConfig %r not understood, no trace", detailed)
        return cls(interval_ms=interval_ms, trace_start=start, trace_steps=count)


def parse_steps(text: str) -> tuple[int, int]:
    """'5:3' -> steps 5, 6, 7; '' or 'none' -> no window."""
    text = (text or "").strip().lower()
    if text in ("", "none", "0"):
        return 0, 0
    first, sep, count = text.partition(":")
    start, n = int(first), int(count) if sep else 1
    if start < 1 or n < 1:
        raise ValueError("START:COUNT with START >= 1 and COUNT >= 1, e.g. 5:3")
    return start, n


class _Gpu:
    def __init__(self, index: int):
        import pynvml  # nvidia-ml-py; optional
        pynvml.nvmlInit()
        self.nvml, self.handle = pynvml, pynvml.nvmlDeviceGetHandleByIndex(index)

    def sample(self) -> tuple[float, float]:
        util = self.nvml.nvmlDeviceGetUtilizationRates(self.handle).gpu
        mem = self.nvml.nvmlDeviceGetMemoryInfo(self.handle).used / 2**30
        return float(util), mem


class SystemMonitor(threading.Thread):
    FIELDS = ["time_s", "cpu_percent", "cpu_max_core_percent", "memory_percent", "process_rss_gb",
              "gpu_percent", "gpu_memory_gb"]

    def __init__(self, path: Path, interval_ms: int, gpu_index: int | None):
        super().__init__(name="system-monitor", daemon=True)
        self.path, self.interval = path, interval_ms / 1000
        self.stopped = threading.Event()
        self.gpu = None
        if gpu_index is not None:
            try:
                self.gpu = _Gpu(gpu_index)
            except Exception as exc:  # no pynvml, no driver: CPU figures only
                log.info("profiler: no GPU utilization (%s)", exc)
        self.process = psutil.Process(os.getpid())
        self.peak_rss_gb = 0.0

    def _rss_gb(self) -> float:
        total = 0
        for proc in [self.process, *self.process.children(recursive=True)]:  # data-loader workers too
            try:
                total += proc.memory_info().rss
            except psutil.Error:  # a worker that exited between listing and reading
                continue
        return total / 2**30

    def run(self) -> None:
        start = time.monotonic()
        psutil.cpu_percent(percpu=True)  # the first call only sets the reference point
        new = not self.path.exists()
        with open(self.path, "a", newline="") as fh:
            out = csv.writer(fh)
            if new:
                out.writerow(self.FIELDS)
            while not self.stopped.wait(self.interval):
                rss = self._rss_gb()
                self.peak_rss_gb = max(self.peak_rss_gb, rss)
                cores = psutil.cpu_percent(percpu=True) or [0.0]
                gpu = self.gpu.sample() if self.gpu else ("", "")
                out.writerow([f"{time.monotonic() - start:.2f}", f"{sum(cores) / len(cores):.1f}", f"{max(cores):.1f}",
                              f"{psutil.virtual_memory().percent:.1f}", f"{rss:.3f}",
                              *(f"{v:.2f}" if v != "" else "" for v in gpu)])
                fh.flush()

    def stop(self) -> None:
        self.stopped.set()
        self.join(timeout=5)


class Profiler:
    """The step log, the system monitor and the optional trace, behind step() and close().

    run_info (workers, cpus, batch_size, ...) goes to run.json with the memory figures at close.
    """

    def __init__(self, out_dir: Path | None, settings: ProfileSettings, device: torch.device,
                 run_info: dict | None = None):
        self.settings, self.device, self.out_dir = settings, device, out_dir
        self.run_info = dict(run_info or {})
        self.global_step = 0
        self.monitor = self.trace = self._steps = self._steps_file = None
        if out_dir is None:  # not the main process
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        # Appended to, so that a job resumed from a checkpoint (spot) keeps its earlier epochs.
        path = out_dir / "steps.csv"
        new = not path.exists()
        self._steps_file = open(path, "a", newline="")
        self._steps = csv.writer(self._steps_file)
        if new:
            self._steps.writerow(["epoch", "step", "data_wait_s", "compute_s", "images"])
        if settings.interval_ms > 0:
            gpu = (device.index or 0) if device.type == "cuda" else None
            self.monitor = SystemMonitor(out_dir / "system.csv", settings.interval_ms, gpu)
            self.monitor.start()
        if settings.trace_steps:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if device.type == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self.trace = torch.profiler.profile(
                activities=activities, record_shapes=True,
                schedule=torch.profiler.schedule(wait=max(settings.trace_start - 2, 0),
                                                 warmup=min(1, settings.trace_start - 1),
                                                 active=settings.trace_steps, repeat=1),
                on_trace_ready=torch.profiler.tensorboard_trace_handler(str(out_dir / "trace")))
            self.trace.start()
            log.info("profiler: tracing steps %d-%d into %s", settings.trace_start,
                     settings.trace_start + settings.trace_steps - 1, out_dir / "trace")

    def step(self, epoch: int, step: int, data_wait: float, compute: float, images: int) -> None:
        self.global_step += 1
        if self._steps is not None:
            self._steps.writerow([epoch, step, f"{data_wait:.5f}", f"{compute:.5f}", images])
        if self.trace is not None:
            self.trace.step()
            if self.global_step >= self.settings.trace_start + self.settings.trace_steps:
                self.trace.stop()
                self.trace = None

    def __enter__(self) -> Profiler:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def memory(self) -> dict:
        """Capacity and this run's peak: GPU memory on a GPU, host memory (RSS with workers) otherwise."""
        if self.device.type == "cuda":
            return {"memory_kind": "gpu",
                    "memory_total_gb": torch.cuda.get_device_properties(self.device).total_memory / 2**30,
                    "memory_peak_gb": torch.cuda.max_memory_reserved(self.device) / 2**30}
        peak = self.monitor.peak_rss_gb if self.monitor is not None else 0.0
        return {"memory_kind": "host", "memory_total_gb": psutil.virtual_memory().total / 2**30,
                "memory_peak_gb": peak or psutil.Process(os.getpid()).memory_info().rss / 2**30}

    def close(self) -> None:
        if self.trace is not None:
            self.trace.stop()
            self.trace = None
        if self.monitor is not None:
            self.monitor.stop()
        if self._steps_file is not None:
            self._steps_file.close()
            self._steps_file = None
            info = {**self.run_info, **self.memory(), "device": str(self.device)}
            (self.out_dir / "run.json").write_text(json.dumps(info, indent=2, sort_keys=True))
