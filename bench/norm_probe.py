"""Batch norm and the ReLU after it, forward and backward, at resnet50's shapes: the step's largest
cost after the convolutions once bf16 makes those fast (docs/benchmarks.md: 24% of a resnet50 full
fine-tuning step on the AMX CPU, where that step reaches 2.83x naive, short of the 3x target).

Each row times one shape in the layouts and precisions that matter: the default's (bf16,
channels-last), bf16 NCHW, naive's (fp32 NCHW), and the default's compiled by `torch.compile`
(inductor), which fuses the two, and on a CPU the job's own kernel for the default's layout
(train.fused_norm, fused-norm=auto); beside them a copy of the same bf16 tensor, the least any pass
over those bytes can take. The variants take turns in every round; each figure is the median.
Where the default's time is many copies', the kernels, not the memory, set the pace.

Sizes as the training benchmark's (128 px, batch 32 on a CPU; 224 px, batch 128 on a GPU);
`--quick` runs tiny ones. Writes bench/results/norm_probe.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F

from bench import machine
from bench.train_throughput import SIZES
from train import fused_norm

# resnet50's batch norm widths and their feature maps, as fractions of the input size
LAYERS = ((64, 4), (256, 4), (512, 8), (1024, 16))
EAGER = {"bf16 channels-last": (torch.bfloat16, True), "bf16 nchw": (torch.bfloat16, False),
         "fp32 nchw": (torch.float32, False)}
COMPILED = "bf16 channels-last compiled"
FUSED = "bf16 channels-last fused-norm"


def bn_relu(x, weight, bias, mean, var):
    return F.relu(F.batch_norm(x, mean, var, weight, bias, training=True, momentum=0.1, eps=1e-5))


def fused_bn_relu(x, weight, bias, mean, var):
    """What a job's blocks run (train.fused_norm): the same pass in one kernel each way."""
    return fused_norm.FusedBatchNorm2d.kernel(x, None, weight, bias, mean, var, 1e-5, 0.1, True)


def make_inputs(shape, dtype, channels_last: bool, device):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g).to(device, dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    c = shape[1]
    params = [torch.ones(c, device=device, requires_grad=True), torch.zeros(c, device=device, requires_grad=True)]
    stats = [torch.zeros(c, device=device), torch.ones(c, device=device)]
    return x.requires_grad_(), params, stats, torch.randn(shape, generator=g).to(device, dtype).contiguous(
        memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def timer(device):
    def now():
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter()
    return now


def step_fn(fn, x, params, stats, grad):
    """One training pass: forward, then the gradients of input, weight and bias (autograd.grad, so
    nothing accumulates into .grad between calls)."""
    def run():
        y = fn(x, *params, *stats)
        torch.autograd.grad(y, [x, *params], grad)
    return run


def probe_shape(shape, variants: dict, rounds: int, device) -> dict:
    now = timer(device)
    runs = {}
    for name, (fn, dtype, channels_last) in variants.items():
        x, params, stats, grad = make_inputs(shape, dtype, channels_last, device)
        runs[name] = step_fn(fn, x, params, stats, grad)
    src = torch.randn(shape).to(device, torch.bfloat16).contiguous(memory_format=torch.channels_last)
    dst = torch.empty_like(src)
    runs["copy"] = lambda: dst.copy_(src)
    for run in runs.values():  # warm-up: allocator, kernels, compiling
        run(), run()
    times = {name: [] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            start = now()
            run()
            times[name].append((now() - start) * 1e3)
    ms = {name: statistics.median(t) for name, t in times.items()}
    return {"shape": list(shape), "ms": ms, "rounds_ms": times,
            "over_copy": {name: ms[name] / ms["copy"] for name in variants}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run that keeps the probe working")
    p.add_argument("--no-compile", action="store_true", help="leave out the compiled variant (compiling takes "
                                                            "seconds per shape)")
    p.add_argument("--rounds", type=int, default=None, help="timed rounds (default: 15; 2 in --quick)")
    p.add_argument("--out", type=Path, default=Path("bench/results/norm_probe.json"))
    args = p.parse_args()
    if args.rounds is not None and args.rounds < 1:
        p.error(f"--rounds takes a positive integer, got {args.rounds}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    size, batch, _, _ = SIZES["quick" if args.quick else device.type]
    rounds = args.rounds or (2 if args.quick else 15)
    variants = {name: (bn_relu, dtype, cl) for name, (dtype, cl) in EAGER.items()}
    if device.type == "cpu" and fused_norm.library() is not None:
        variants[FUSED] = (fused_bn_relu, torch.bfloat16, True)
    if not args.no_compile:
        # one compiled graph per shape: raise dynamo's recompile limit past the shapes probed
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 2 * len(LAYERS))
        variants[COMPILED] = (torch.compile(bn_relu, dynamic=False), torch.bfloat16, True)
    names = list(variants)
    host = machine.describe(device)
    print(f"batch norm + ReLU, forward and backward, on {device} ({machine.line(host)}, "
          f"torch {torch.__version__}): "
          f"batch {batch}, resnet50's shapes at {size} px, median of {rounds} rounds taking turns; ms, and in "
          f"brackets over a copy of the same bf16 tensor")
    header = f"{'channels x map':<16}{'copy':>8}" + "".join(f"{n:>32}" for n in names)
    print(header + "\n" + "-" * len(header))
    rows = []
    for channels, divisor in LAYERS:
        side = max(1, size // divisor)
        row = probe_shape((batch, channels, side, side), variants, rounds, device)
        rows.append(row)
        cells = "".join(f"{row['ms'][n]:>22.2f} ({row['over_copy'][n]:>5.1f}x)" for n in names)
        print(f"{f'{channels} x {side}x{side}':<16}{row['ms']['copy']:>8.2f}{cells}", flush=True)
    report = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "device": str(device),
              "machine": host, "cpus": os.cpu_count(), "torch": torch.__version__,
              "size": size, "batch": batch, "rounds": rounds, "variants": names, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
