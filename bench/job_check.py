"""Real training jobs on this machine's device, started as SageMaker starts one: `python -m train`
in a job directory holding the contract's files, SM_NUM_GPUS as SageMaker sets it, on drawn shapes
(train.synthetic) that a model learns. Every GPU run of this project so far was the benchmark's
loops (bench.train_throughput), never a job: the job's own path on CUDA (its loader running ahead
across epochs, pinning, evaluation, the checkpoint, the bf16 and int8 checks, the artifact) had
not run there. bench/gpu_check.sh runs this after the benchmark.

Two jobs, each under its own limit: `default` (resnet50, full fine-tuning, every other
hyperparameter at its default) and `gpu-decode` (resnet18, frozen backbone, gpu-decode=true:
nvJPEG in a job). Printed per job: its exit status and seconds, the device and precision it
trained in, its loader, each epoch's images/s and data wait, test accuracy, bf16 and int8
agreement, and what its model and checkpoint directories hold; for a job that failed, its failure
file; for one its limit ended, where it was (or the end of its log). Each job's log and
metrics.json are kept beside --out. Exit status 1 when a job fails or its limit ends it.
`--quick`: tiny sizes on any device (tests/test_bench.py).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from train.synthetic import SHAPES, draw

ROOT = Path(__file__).resolve().parents[1]
# weights=none: nothing to download (a pretrained start is the CPU tests' part).
JOBS = {
    "default": {"arch": "resnet50", "weights": "none", "epochs": "4"},
    # cache-images=false: images decoded once in memory would turn gpu-decode off
    "gpu-decode": {"arch": "resnet18", "weights": "none", "freeze": "backbone", "gpu-decode": "true",
                   "cache-images": "false", "epochs": "3"},
}
LOGGED = ("model", "decode once", "gpu-decode", "random crop", "data")  # what a job's log says it ran
# (image px, train and test images per class, hyperparameters for every job)
SIZES = {"full": (256, 800, 50, {}),
         "quick": (48, 12, 3, {"image-size": "32", "batch-size": "8", "num-workers": "0", "epochs": "2",
                               "arch": "resnet18"})}
CHUNK = 100  # images a drawing process writes at a time; the chunks, not the CPU count, fix the images


def _draw_chunk(task: tuple) -> None:
    root, split, shape, start, count, size, seed = task
    rng = random.Random(f"{seed}/{split}/{shape}/{start}")
    for i in range(start, start + count):
        draw(shape, size, rng).save(Path(root) / split / shape / f"{shape}_{i:05d}.jpg", quality=90)


def make_shapes(root: Path, size: int, per_class: int, test_per_class: int, seed: int = 0) -> None:
    """root/train and root/test as class folders, drawn in parallel."""
    tasks = []
    for split, count in (("train", per_class), ("test", test_per_class)):
        for shape in SHAPES:
            (root / split / shape).mkdir(parents=True)
            tasks += [(str(root), split, shape, i, min(CHUNK, count - i), size, seed) for i in range(0, count, CHUNK)]
    with ProcessPoolExecutor(max(1, min(len(tasks), os.cpu_count() or 1))) as pool:
        list(pool.map(_draw_chunk, tasks))


def job_env(base: Path, num_gpus: int) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SM_")}
    env.update(SAGEMAKER_BASE_DIR=str(base), SM_NUM_GPUS=str(num_gpus), PYTHONUNBUFFERED="1", PYTHONFAULTHANDLER="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    return env


def run_job(name: str, hps: dict, data: Path, work: Path, python: list[str], limit: float, num_gpus: int) -> dict:
    """One job in work/name, its data a link to the shared shapes; the job's process group is
    killed at the limit, loader workers included."""
    base = work / name
    config = base / "input" / "config"
    config.mkdir(parents=True)
    (base / "input" / "data").symlink_to(data, target_is_directory=True)
    (config / "hyperparameters.json").write_text(json.dumps(hps))
    (config / "resourceconfig.json").write_text(json.dumps({"current_host": "algo-1", "hosts": ["algo-1"]}))
    spec = {"TrainingInputMode": "File", "S3DistributionType": "FullyReplicated", "RecordWrapperType": "None"}
    (config / "inputdataconfig.json").write_text(json.dumps({"train": spec, "test": spec}))
    log_path = base / "job.log"
    start = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen([*python, "-m", "train"], cwd=base, env=job_env(base, num_gpus), stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=limit)
            status = "ok" if rc == 0 else "failed"
        except subprocess.TimeoutExpired:
            # SIGABRT first: the job's faulthandler (PYTHONFAULTHANDLER) writes where each thread
            # waits into its log; then the whole group, loader workers included.
            with contextlib.suppress(ProcessLookupError):  # it may have ended meanwhile
                os.kill(proc.pid, signal.SIGABRT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            rc, status = proc.wait(), "timed out"
        except BaseException:  # this check stopped (gpu_check.sh's timeout: SIGTERM): the job with it
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            raise
    seconds = time.perf_counter() - start
    return {"job": name, "hyperparameters": hps, "status": status, "exit": rc, "seconds": round(seconds, 1),
            **outcome(base, log_path.read_text(errors="replace"))}


def outcome(base: Path, log: str) -> dict:
    """What a job left: its log's lines on its model and data path, the metrics file's epochs and final
    figures, the model and checkpoint directories' files, its failure file, where an aborted job's
    main thread was, and the log's end."""
    lines = log.splitlines()
    said = [next((ln.split(" INFO ", 1)[1] for ln in lines if f" INFO {key}: " in ln), None) for key in LOGGED]
    metrics_path = base / "output" / "data" / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
    final = metrics.get("final", {})
    failure = base / "output" / "failure"
    model_dir, checkpoints = base / "model", base / "checkpoints"
    return {"logged": [line for line in said if line],
            "epochs": [{k: e.get(k) for k in ("epoch", "images_per_sec", "data_wait", "valid_acc")}
                       for e in metrics.get("history", [])],
            **{k: final.get(k) for k in ("test_acc", "bf16_top1_agreement", "int8_top1_agreement")},
            "model_files": sorted(p.name for p in model_dir.iterdir()) if model_dir.is_dir() else [],
            "checkpoint_files": sorted(p.name for p in checkpoints.iterdir()) if checkpoints.is_dir() else [],
            "failure": failure.read_text(errors="replace")[:2000] if failure.is_file() else None,
            "log_tail": "\n".join(ln for ln in lines[-15:] if not ln.startswith("Extension modules:")),
            "stack": stack_top(lines)}


def stack_top(lines: list[str], frames: int = 10) -> list[str]:
    """The innermost frames of the thread the abort interrupted (faulthandler writes them first,
    after a 'Current thread ... (most recent call first):' line): where a job its limit ended was."""
    starts = [i for i, ln in enumerate(lines) if ln.startswith("Current thread ")]
    if not starts:
        return []
    return [ln.strip() for ln in lines[starts[-1] + 1:] if ln.strip().startswith("File ")][:frames]


def _figure(value, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def report_lines(r: dict) -> list[str]:
    hps = " ".join(f"{k}={v}" for k, v in r["hyperparameters"].items())
    out = [f"job {r['job']} ({hps}): {r['status']}, exit {r['exit']}, {r['seconds']} s"]
    out += [f"  {line}" for line in r["logged"]]
    if r["epochs"]:
        out.append("  " + "; ".join(f"epoch {e['epoch']}: {_figure(e['images_per_sec'], '.0f')} img/s, data wait "
                                    f"{_figure(e['data_wait'], '.3f')}" for e in r["epochs"]))
        out.append(f"  test accuracy {_figure(r['test_acc'], '.3f')} (chance {1 / len(SHAPES):.3f}); top-1 agreement "
                   f"with fp32: bf16 {_figure(r['bf16_top1_agreement'], '.3f')}, "
                   f"int8 {_figure(r['int8_top1_agreement'], '.3f')}")
    out.append(f"  model directory: {' '.join(r['model_files']) or 'empty'}; checkpoints: "
               f"{' '.join(r['checkpoint_files']) or 'none'}")
    if r["failure"]:
        out.append("  failure file: " + " | ".join(ln.strip() for ln in r["failure"].splitlines() if ln.strip()))
    elif r["stack"]:
        out.append("  where its main thread was, innermost first:")
        out += [f"    {line}" for line in r["stack"]]
    elif r["status"] != "ok":
        out.append("  the end of its log:" + ("" if r["log_tail"] else " (empty)"))
        out += [f"    {line}" for line in r["log_tail"].splitlines()]
    return out


def serve_check(model_dir: Path, test_dir: Path, device: str, repeats: int = 10) -> list[dict]:
    """A finished job's artifact as the endpoint serves it (serve.predictor, the handler's model,
    without MMS, which the device image lacks): on `device` in fp32, then with precision=auto there
    and on the CPU. Per row the precision picked and why, accuracy over the test JPEGs, top-1
    agreement with the fp32 row, and the median in-process time of a 1-image request and one of up
    to 32 images (decode, preprocess, forward)."""
    from serve.predictor import Predictor

    paths = sorted(test_dir.glob("*/*.jpg"))
    payloads, labels = [p.read_bytes() for p in paths], [p.parent.name for p in paths]
    rows, first = [], None
    # dict.fromkeys keeps the order and drops the repeat: on a CPU-only run (--quick) the last row
    # would be the second again.
    for where, precision in dict.fromkeys([(device, "fp32"), (device, "auto"), ("cpu", "auto")]):
        predictor = Predictor.from_model_dir(model_dir, where, precision=precision)
        predictor.warm_up()
        top1 = predictor.predict(payloads).argmax(1)
        first = top1 if first is None else first
        names = [predictor.class_names[i] for i in top1]
        batch = min(32, len(payloads))
        ms = {}
        for n in (1, batch):
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                predictor.predict(payloads[:n])
                times.append(1000 * (time.perf_counter() - start))
            ms[n] = statistics.median(times)
        rows.append({"device": str(predictor.device), "requested": precision, "precision": predictor.precision,
                     "why": predictor.precision_reason, "images": len(paths),
                     "accuracy": sum(a == b for a, b in zip(names, labels, strict=True)) / max(1, len(paths)),
                     "agreement_with_fp32": float((top1 == first).mean()), "ms_1": ms[1], "batch": batch,
                     "ms_batch": ms[batch]})
    return rows


def serve_lines(rows: list[dict]) -> list[str]:
    out = []
    for i, r in enumerate(rows):
        agree = "" if i == 0 else f", top-1 agreement with fp32 {r['agreement_with_fp32']:.3f}"
        out.append(f"  served on {r['device']}, {r['requested']} -> {r['precision']}: accuracy {r['accuracy']:.3f} over "
                   f"{r['images']} test JPEGs{agree}; in process {r['ms_1']:.1f} ms for 1 image, "
                   f"{r['ms_batch']:.1f} ms for {r['batch']}")
        if r["requested"] == "auto":
            out.append(f"    ({r['why']})")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny sizes and resnet18: a smoke run on any device")
    p.add_argument("--jobs", default=",".join(JOBS), help=f"which jobs, comma-separated: {', '.join(JOBS)}")
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                   help="a hyperparameter for every job, after the job's own (repeatable), e.g. compile=true")
    p.add_argument("--limit", type=float, default=75.0, help="seconds each job may run (default 75)")
    p.add_argument("--python", default=sys.executable, help="the interpreter the jobs run on (default this one)")
    p.add_argument("--out", type=Path, default=Path("bench/results/job_check.json"))
    args = p.parse_args(argv)
    names = [n for n in args.jobs.split(",") if n]
    if not names or any(n not in JOBS for n in names):
        p.error(f"--jobs takes names among {', '.join(JOBS)}, got {args.jobs!r}")
    extra = {}
    for item in args.set:
        name, eq, value = item.partition("=")
        if not eq or not name:
            p.error(f"--set takes NAME=VALUE, got {item!r}")
        extra[name] = value
    if args.limit <= 0:
        p.error(f"--limit takes a positive number of seconds, got {args.limit}")

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))  # run_job's cleanup runs
    import torch  # after the arguments: a mistyped flag answers without torch's import time

    num_gpus = torch.cuda.device_count()
    if not num_gpus and not args.quick:
        p.error("without --quick the jobs are a GPU's (resnet50 at 224 px on 4800 images), which a CPU would not "
                "finish within --limit: add --quick here (tiny sizes; --set NAME=VALUE changes any hyperparameter)")
    size, per_class, test_per_class, sized = SIZES["quick" if args.quick else "full"]
    print(f"training jobs as SageMaker starts them (python -m train), {num_gpus} GPU(s): drawn shapes at {size} px, "
          f"{per_class} train and {test_per_class} test images per class, {len(SHAPES)} classes; at most "
          f"{args.limit:.0f} s each", flush=True)
    results = []
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="job-check-") as tmp:
        work = Path(tmp)
        started = time.perf_counter()
        make_shapes(work / "data", size, per_class, test_per_class)
        print(f"  images drawn in {time.perf_counter() - started:.1f} s", flush=True)
        for name in names:
            r = run_job(name, {**JOBS[name], **sized, **extra}, work / "data", work, args.python.split(), args.limit,
                        num_gpus)
            results.append(r)
            print("\n".join(report_lines(r)), flush=True)
            for src, suffix in (("job.log", ".log"), ("output/data/metrics.json", "_metrics.json")):
                if (work / name / src).is_file():
                    shutil.copy(work / name / src, args.out.with_name(f"job_{name}{suffix}"))
        served = next((r["job"] for r in results if r["status"] == "ok"), None)
        serving = {"job": served}
        if served is not None:
            job_acc = next(r["test_acc"] for r in results if r["job"] == served)
            print(f"the {served} job's model as the endpoint serves it (serve.predictor; the job's own test accuracy, "
                  f"in its training precision: {_figure(job_acc, '.3f')})", flush=True)
            try:
                serving["rows"] = serve_check(work / served / "model", work / "data" / "test",
                                              "cuda" if num_gpus else "cpu")
                print("\n".join(serve_lines(serving["rows"])), flush=True)
            except Exception as exc:  # noqa: BLE001 — whatever fails is the finding; printed, exit 1
                serving["error"] = f"{type(exc).__name__}: {exc}"
                print(f"  FAILED: {serving['error']}", flush=True)
    failed = [r["job"] for r in results if r["status"] != "ok"]
    args.out.write_text(json.dumps({"gpus": num_gpus, "quick": args.quick, "jobs": results, "serving": serving},
                                   indent=2))
    print(f"{len(results) - len(failed)} of {len(results)} jobs finished"
          + (f"; not finished: {', '.join(failed)}" if failed else "")
          + ("; serving failed" if "error" in serving else "") + f"; results in {args.out}")
    return 1 if failed or "error" in serving else 0


if __name__ == "__main__":
    raise SystemExit(main())
