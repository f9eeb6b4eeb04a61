"""Serving settings, read from the environment once, at the edge, and checked at start-up.

SageMaker's own variables (SAGEMAKER_*) keep their meaning; ours start with IMGCLS_. A wrong
value stops `serve` before the model server starts, with a message naming the variable.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

from imgcls.errors import ClassifierError
from imgcls.images import DEFAULT_MAX_PIXELS
from imgcls.inference import MODES

MIB = 1024 * 1024
MAX_CPU_WORKERS = 8
# SageMaker real-time endpoints accept at most 6 MB per request; batch transform allows more
# through SAGEMAKER_MAX_PAYLOAD_IN_MB.
DEFAULT_MAX_PAYLOAD_MB = 6
# `serve` names a file here; a worker that cannot load the model writes why, and `serve` stops.
LOAD_FAILURE_FILE_ENV = "IMGCLS_LOAD_FAILURE_FILE"
# ...and a worker that has loaded and warmed up the model adds a line here.
READY_FILE_ENV = "IMGCLS_READY_FILE"


class SettingsError(ClassifierError):
    """An environment variable has a value serving cannot use."""


@dataclass(frozen=True)
class UrlPolicy:
    enabled: bool = False
    allow_private: bool = False
    max_bytes: int = 10 * MIB
    timeout_s: float = 5.0


@dataclass(frozen=True)
class Settings:
    max_body_bytes: int = DEFAULT_MAX_PAYLOAD_MB * MIB
    max_pixels: int = DEFAULT_MAX_PIXELS
    default_top_k: int = 5
    chunk_size: int = 32          # images per forward pass; a bigger request runs in chunks
    threads: int = 0              # intra-op threads per worker; 0 leaves torch's default
    precision: str = "auto"       # auto: bf16 or int8 where the artifact's agreement allows (predictor)
    compile: str = "auto"         # how the model runs: imgcls.inference (frozen trace on CPU, eager on GPU)
    access_log: bool = False      # the model server prints a line per request
    server_timing: bool = False   # a Server-Timing header on each answer: our handler's and the model's time
    url: UrlPolicy = UrlPolicy()

    @classmethod
    def from_env(cls, environ=os.environ) -> Settings:
        env = _Env(environ)
        if "IMGCLS_MAX_BODY_BYTES" in environ:  # set by `serve` for its workers
            max_body = env.integer("IMGCLS_MAX_BODY_BYTES", 0, minimum=1)
        else:
            max_body = round(env.number("SAGEMAKER_MAX_PAYLOAD_IN_MB", DEFAULT_MAX_PAYLOAD_MB, minimum=0.001) * MIB)
        precision = environ.get("IMGCLS_PRECISION", "auto").strip().lower() or "auto"
        if precision not in ("auto", "fp32", "bf16", "fp16", "int8"):
            raise SettingsError(f"IMGCLS_PRECISION={precision!r} is not one of auto, fp32, bf16, fp16, int8.")
        compile_mode = environ.get("IMGCLS_COMPILE", "auto").strip().lower() or "auto"
        if compile_mode not in MODES:
            raise SettingsError(f"IMGCLS_COMPILE={compile_mode!r} is not one of {', '.join(MODES)}.")
        return cls(
            max_body_bytes=max_body,
            max_pixels=env.integer("IMGCLS_MAX_PIXELS", DEFAULT_MAX_PIXELS, minimum=1),
            default_top_k=env.integer("IMGCLS_TOP_K", 5, minimum=1),
            chunk_size=env.integer("IMGCLS_CHUNK_SIZE", 32, minimum=1),
            threads=env.integer("IMGCLS_THREADS", 0, minimum=0),
            precision=precision,
            compile=compile_mode,
            access_log=env.flag("IMGCLS_ACCESS_LOG"),
            server_timing=env.flag("IMGCLS_SERVER_TIMING"),
            url=UrlPolicy(
                enabled=env.flag("IMGCLS_URL_FETCH"),
                allow_private=env.flag("IMGCLS_URL_ALLOW_PRIVATE"),
                max_bytes=round(env.number("IMGCLS_URL_MAX_MB", 10, minimum=0.001) * MIB),
                timeout_s=env.number("IMGCLS_URL_TIMEOUT_S", 5.0, minimum=0.1),
            ),
        )


class _Env:
    def __init__(self, environ):
        self.environ = environ

    def _raw(self, name: str) -> str | None:
        value = self.environ.get(name)
        return None if value is None or not value.strip() else value.strip()

    def number(self, name: str, default: float, minimum: float) -> float:
        raw = self._raw(name)
        if raw is None:
            return float(default)
        try:
            value = float(raw)
        except ValueError:
            raise SettingsError(f"{name}={raw!r} is not a number.") from None
        if not math.isfinite(value) or value < minimum:
            raise SettingsError(f"{name}={raw!r} must be a number >= {minimum}.")
        return value

    def integer(self, name: str, default: int, minimum: int) -> int:
        raw = self._raw(name)
        if raw is None:
            return default
        try:
            value = int(raw)
        except ValueError:
            raise SettingsError(f"{name}={raw!r} is not a whole number.") from None
        if value < minimum:
            raise SettingsError(f"{name}={raw!r} must be at least {minimum}.")
        return value

    def flag(self, name: str) -> bool:
        raw = (self._raw(name) or "false").lower()
        if raw in ("1", "true", "yes", "on"):
            return True
        if raw in ("0", "false", "no", "off"):
            return False
        raise SettingsError(f"{name}={raw!r} is not a boolean; use true or false.")


CGROUP_ROOT = Path("/sys/fs/cgroup")


def available_cpus(cgroup_root: Path = CGROUP_ROOT) -> int:
    """CPUs this process may use: its affinity mask, capped by a cgroup CPU quota (containers)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus = os.cpu_count() or 1
    quota = cgroup_cpu_quota(cgroup_root)
    if quota:
        cpus = min(cpus, max(1, math.floor(quota)))
    return max(1, cpus)


def cgroup_cpu_quota(root: Path = CGROUP_ROOT) -> float | None:
    """CPUs' worth of time the cgroup may use (1.5: one and a half), None without a limit: cgroup
    v2's cpu.max, else v1's cfs quota and period (docker on older hosts)."""
    try:  # v2: "max 100000" (no limit) or "200000 100000"
        quota, period = (root / "cpu.max").read_text().split()[:2]
        if quota != "max" and int(period) > 0:
            return int(quota) / int(period)
    except (OSError, ValueError):
        pass  # no v2 CPU controller here, or a file it did not write: try v1 below
    try:
        quota_us = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period_us = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return None if quota_us <= 0 or period_us <= 0 else quota_us / period_us
    except (OSError, ValueError):
        return None


def plan_concurrency(cpus: int, gpus: int, workers: str | None = None, threads: str | None = None) -> tuple[int, int]:
    """(model server workers, intra-op threads per worker) that together use the CPUs once.

    MMS's default is one worker per CPU, each with a model copy and torch's default of one
    thread per CPU: N^2 threads fighting for N cores. On GPU we run one worker per GPU. On CPU a
    request is usually one image, and one image keeps a single core busy far better than it
    keeps several busy: measured on 2 cores, 2 workers x 1 thread answered 1.5x the requests of
    1 worker x 2 threads at concurrency 4, for about 3 ms more per request at concurrency 1
    (docs/benchmarks.md). So one single-threaded worker per CPU, up to MAX_CPU_WORKERS (each
    holds a model copy and a Python process), the threads shared out above that.
    SAGEMAKER_MODEL_SERVER_WORKERS=1 serves one request at a time with every core instead.
    """
    env = _Env({"SAGEMAKER_MODEL_SERVER_WORKERS": workers or "", "OMP_NUM_THREADS": threads or ""})
    default_workers = gpus if gpus > 0 else min(cpus, MAX_CPU_WORKERS)
    n_workers = env.integer("SAGEMAKER_MODEL_SERVER_WORKERS", default_workers, minimum=1)
    n_threads = env.integer("OMP_NUM_THREADS", max(1, cpus // n_workers), minimum=1)
    return n_workers, n_threads
