"""Training throughput: images/s of the real trainer pieces, end to end and on in-memory tensors.

For each architecture, freeze policy and configuration (fp32 NCHW, and the default: channels-last
with autocast), it measures side by side in one run:
  synthetic   the training step on random tensors already in memory (the model's own ceiling)
  end-to-end  train_one_epoch over JPEG files through the data loader and presets, as a job runs
and prints end-to-end / synthetic, plus default / fp32. Writes bench/results/train_throughput.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch import nn

from imgcls.models import create_model
from imgcls.presets import ClassificationPresetTrain
from train import data, finetune
from train.engine import Batcher, choose_precision, train_one_epoch
from train.job import auto_workers
from train.synthetic import make_dataset


def build(arch, classes, freeze, channels_last, device):
    torch.manual_seed(0)
    model = create_model(arch, classes)
    frozen = finetune.frozen_prefixes(model, freeze)
    finetune.apply_freeze(model, frozen)
    model.to(device, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    opt = finetune.make_optimizer("sgd", finetune.param_groups(model, 1e-4), 0.01, 0.9, 1e-8)
    return model, frozen, opt


def run_epoch(model, frozen, opt, loader, preset, precision, device, channels_last):
    batcher = Batcher(device, preset.normalize, channels_last)
    sched = finetune.warmup_cosine(opt, 10**6, 0)
    scaler = torch.amp.GradScaler(device.type) if precision.scaler else None
    return train_one_epoch(model, loader, batcher, nn.CrossEntropyLoss(), opt, sched, precision, scaler, 1,
                           lambda: finetune.set_train_mode(model, frozen))


class InMemory:
    """A loader-shaped source of uint8 batches that are already in memory: no decode, no workers."""

    def __init__(self, batch, steps, image_size, classes):
        g = torch.Generator().manual_seed(0)
        self.images = torch.randint(0, 256, (batch, 3, image_size, image_size), dtype=torch.uint8, generator=g)
        self.labels = torch.randint(0, classes, (batch,), generator=g)
        self.steps = steps

    def __iter__(self):
        return iter([(self.images, self.labels)] * self.steps)

    def __len__(self):
        return self.steps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run that keeps the benchmark working")
    p.add_argument("--archs", default="resnet18,resnet50")
    p.add_argument("--image-size", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--steps", type=int, help="timed steps per measurement")
    p.add_argument("--out", type=Path, default=Path("bench/results/train_throughput.json"))
    args = p.parse_args()
    size = args.image_size or (32 if args.quick else 128)
    batch = args.batch_size or (4 if args.quick else 32)
    steps = args.steps or (2 if args.quick else 8)
    classes = 6
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    workers = auto_workers(os.cpu_count() or 1, 1, device.type == "cuda")

    tmp = Path(tempfile.mkdtemp(prefix="bench-"))
    per_class = -(-batch * steps // classes)
    make_dataset(tmp, per_class=per_class, size=int(size * 1.25), classes=classes, seed=0)
    channel = data.scan_channel("train", tmp / "train", workers=2)

    configs = [("fp32-nchw", "fp32", False), ("default", "auto", True)]
    rows = []
    for arch in args.archs.split(","):
        for freeze in ("backbone", "none"):
            for label, prec_name, channels_last in configs:
                precision = choose_precision(prec_name, device)
                preset = ClassificationPresetTrain(size, "light")
                model, frozen, opt = build(arch, classes, freeze, channels_last, device)
                warm = InMemory(batch, 2, size, classes)
                run_epoch(model, frozen, opt, warm, preset, precision, device, channels_last)
                synthetic = run_epoch(model, frozen, opt, InMemory(batch, steps, size, classes), preset, precision,
                                      device, channels_last)
                loader = data.make_loader(channel, preset, batch, shuffle=True, seed=0, workers=workers,
                                          pin_memory=device.type == "cuda", drop_last=True)
                run_epoch(model, frozen, opt, loader, preset, precision, device, channels_last)  # workers start
                loader.sampler.set_epoch(1)
                e2e = run_epoch(model, frozen, opt, loader, preset, precision, device, channels_last)
                rows.append({"arch": arch, "freeze": "frozen" if freeze == "backbone" else "full", "config": label,
                             "precision": precision.name, "channels_last": channels_last,
                             "synthetic_img_s": synthetic.images_per_second, "end_to_end_img_s": e2e.images_per_second,
                             "e2e_over_synthetic": e2e.images_per_second / synthetic.images_per_second,
                             "data_wait": e2e.data_wait_fraction})
                r = rows[-1]
                print(f"  measured {arch} {r['freeze']} {label}: {r['end_to_end_img_s']:.1f} img/s", flush=True)
    for r in rows:
        base = next(b for b in rows if b["arch"] == r["arch"] and b["freeze"] == r["freeze"]
                    and b["config"] == "fp32-nchw")
        r["speedup_vs_fp32"] = r["end_to_end_img_s"] / base["end_to_end_img_s"]

    print(f"\ntraining throughput, {device} ({platform.processor() or platform.machine()}, {os.cpu_count()} CPUs), "
          f"image {size}px, batch {batch}, {steps} steps, {workers} loader workers")
    header = f"{'arch':<10}{'mode':<8}{'config':<11}{'prec':<6}{'synthetic':>11}{'end-to-end':>12}{'e2e/syn':>9}" \
             f"{'vs fp32':>9}{'wait':>7}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['arch']:<10}{r['freeze']:<8}{r['config']:<11}{r['precision']:<6}{r['synthetic_img_s']:>11.1f}"
              f"{r['end_to_end_img_s']:>12.1f}{r['e2e_over_synthetic']:>9.2f}{r['speedup_vs_fp32']:>9.2f}"
              f"{r['data_wait']:>7.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "device": str(device),
        "cpus": os.cpu_count(), "torch": torch.__version__, "image_size": size, "batch_size": batch,
        "steps": steps, "workers": workers, "quick": args.quick, "rows": rows}, indent=2))
    print(f"\nwritten to {args.out}")


if __name__ == "__main__":
    t0 = time.perf_counter()
    main()
    print(f"({time.perf_counter() - t0:.0f} s)")
