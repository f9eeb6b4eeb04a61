"""One optimizer step over a model's parameters, as a job makes it (train.finetune.make_optimizer),
against the same fused kernel stepping channels-last weights themselves, and against that kernel on
the same weights in the contiguous layout, which no kernel copies.

torch 2.14's fused CPU kernels copy every gradient that is not contiguous before the step, and do
not use the copy; a job on a CPU steps its channels-last weights as 1-D views of their memory
instead (train.memory_order). The three take turns in every round; each figure is the median, in
ms, and as GB/s of the bytes the update must read and write (weights, gradients, the state).

SGD (the jobs' default, Nesterov momentum) and AdamW (the training benchmark's), resnet18 and
resnet50, every parameter trained; `--quick` steps resnet18 only. Writes
bench/results/optimizer_probe.json.
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

from bench import machine
from imgcls.models import create_model
from train import finetune, memory_order

OPTIMIZERS = ("sgd", "adamw")
VARIANTS = ("as a job steps", "kernel on the weights", "contiguous weights")
# float32 tensors the update reads and writes per parameter element: weight, gradient and state
# read, weight and state written (SGD: one momentum buffer; AdamW: two moments)
PASSES = {"sgd": 3 + 2, "adamw": 4 + 3}


def make(name: str, arch: str, variant: str):
    """A model's parameters with random gradients, and the optimizer that steps them."""
    torch.manual_seed(0)
    model = create_model(arch, 10)
    model.to(memory_format=torch.contiguous_format if variant == "contiguous weights" else torch.channels_last)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    return model, finetune.make_optimizer(name, finetune.param_groups(model, 0.05), 0.01, 0.9, 1e-8,
                                          views=variant != "kernel on the weights")


def probe(name: str, arch: str, rounds: int) -> dict:
    steps = {v: make(name, arch, v) for v in VARIANTS}
    for _, opt in steps.values():  # warm-up: the state is made at the first step
        opt.step(), opt.step()
    times = {v: [] for v in VARIANTS}
    for _ in range(rounds):
        for v, (_, opt) in steps.items():
            start = time.perf_counter()
            opt.step()
            times[v].append((time.perf_counter() - start) * 1e3)
    ms = {v: statistics.median(t) for v, t in times.items()}
    params = sum(p.numel() for p in steps[VARIANTS[0]][0].parameters())
    gigabytes = PASSES[name] * 4 * params / 1e9
    return {"optimizer": name, "arch": arch, "parameters": params,
            "views": isinstance(steps[VARIANTS[0]][1], memory_order.InMemoryOrder),
            "ms": ms, "rounds_ms": times, "gb_s": {v: gigabytes / (t / 1e3) for v, t in ms.items()},
            "kernel_over_views": ms["kernel on the weights"] / ms["as a job steps"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="resnet18 only, 2 rounds: a smoke run that keeps the "
                                                        "probe working")
    p.add_argument("--rounds", type=int, default=None, help="timed rounds (default: 15; 2 in --quick)")
    p.add_argument("--out", type=Path, default=Path("bench/results/optimizer_probe.json"))
    args = p.parse_args()
    if args.rounds is not None and args.rounds < 1:
        p.error(f"--rounds takes a positive integer, got {args.rounds}")
    rounds = args.rounds or (2 if args.quick else 15)
    archs = ("resnet18",) if args.quick else ("resnet18", "resnet50")
    host = machine.describe(torch.device("cpu"))
    print(f"one fused optimizer step on the CPU ({machine.line(host)}, torch {torch.__version__}), "
          f"median of {rounds} rounds taking turns; ms, and in brackets GB/s of the update's bytes")
    header = f"{'optimizer':<10}{'arch':<10}" + "".join(f"{v:>30}" for v in VARIANTS) + f"{'kernel / job':>14}"
    print(header + "\n" + "-" * len(header))
    rows = []
    for arch in archs:
        for name in OPTIMIZERS:
            row = probe(name, arch, rounds)
            rows.append(row)
            cells = "".join(f"{row['ms'][v]:>20.2f} ({row['gb_s'][v]:>5.1f} GB/s)" for v in VARIANTS)
            print(f"{name:<10}{arch:<10}{cells}{row['kernel_over_views']:>13.2f}x", flush=True)
    report = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": host,
              "cpus": os.cpu_count(), "torch": torch.__version__, "rounds": rounds, "variants": list(VARIANTS),
              "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
