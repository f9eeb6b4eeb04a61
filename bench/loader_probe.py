"""The training data path alone against the loader's settings: images/s of the training loader's
epoch through the batcher to the device (decode or cached crop, collate, copy, normalize; no
model), for several worker counts with the batches pinned in the data loader's pin_memory thread,
in the training thread, or not at all (train.data.PINNINGS); the seconds to each epoch's first
batch; and the seconds the loader takes to shut its workers down when it is freed.

Why: on an H200 with 16 CPUs (docs/benchmarks.md, 2026-12-04) 16 workers fed resnet50 at 0.68 of
its in-memory rate even with the images decoded once, about what one worker crops on a 2-core CPU,
and the bench's process outlived its work by minutes after its loaders were freed. This probe
separates the two questions (how fast can the loader go; does shutting it down wait) from the model
in one short run. `uncached-pillow` decodes every JPEG through Pillow, as the trainer did before
imgcls.images.decode took plain JPEGs to libjpeg-turbo through torchvision.io (the same pixels);
the images decoded once for `cached` are also decoded both ways, and each way's seconds printed.
On a CPU pinned memory is a no-op (torch needs an accelerator for it): the probe
runs the unpinned rows only, but for --quick, where the others keep their code working.

Sizes as the training benchmark's (224 px, batch 128 on a GPU); `--quick` runs tiny ones. Writes
bench/results/loader_probe.json.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import statistics
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from bench import machine
from bench.train_throughput import SIZES, choices, data_path_rate, photo_channel
from imgcls import images
from imgcls.presets import ClassificationPresetEval, ClassificationPresetTrain
from train import cache, data
from train.engine import Batcher
from train.job import auto_workers

SOURCES = ("cached", "uncached", "uncached-pillow")


@contextlib.contextmanager
def pillow_only(on: bool = True):
    """imgcls.images without torchvision's JPEG decoder, so that every image goes through Pillow (in
    the loader's workers too: they fork inside)."""
    saved = images.decode_jpeg
    if on:
        images.decode_jpeg = None
    try:
        yield
    finally:
        images.decode_jpeg = saved


def worker_counts(cpus: int, on_gpu: bool) -> list[int]:
    """What num-workers=auto picks, then a half and a quarter of it (uncached, where all are used)."""
    auto = auto_workers(cpus, 1, on_gpu)
    return sorted({auto, max(1, auto // 2), max(1, auto // 4)}, reverse=True)


def probe(channel, train_cache, source: str, workers: int, pinning: str, args, device) -> dict:
    preset = ClassificationPresetTrain(args.size, "light")
    loader_pins, batcher_pins = data.pinning(pinning, device.type == "cuda")
    loader = data.make_loader(channel, preset, args.batch, shuffle=True, seed=0, workers=workers,
                              pin_memory=loader_pins, drop_last=True, cache=train_cache if source == "cached" else None)
    batcher = Batcher(device, preset.normalize, channels_last=True, pin=batcher_pins)
    with pillow_only(source == "uncached-pillow"):
        first, _ = data_path_rate(loader, batcher, 0)  # workers start
        epochs = [data_path_rate(loader, batcher, e) for e in range(1, args.rounds + 1)]
        start = time.perf_counter()
        del loader  # persistent workers: freeing the loader shuts them down
        gc.collect()
        shutdown = time.perf_counter() - start
    rates = [rate for rate, _ in epochs]
    row = {"source": source, "workers": workers, "pinning": pinning, "first_epoch_img_s": first,
           "img_s": statistics.median(rates), "rounds": rates,
           "first_batch_s": statistics.median(f for _, f in epochs), "shutdown_s": shutdown}
    print(f"  {source:<16}{workers:>8}  {pinning:<7}{row['img_s']:>10.0f}{row['first_batch_s']:>10.3f}"
          f"{shutdown:>12.2f}", flush=True)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run that keeps the probe working")
    p.add_argument("--workers", help="worker counts, comma-separated (default: num-workers=auto, a half, a quarter)")
    p.add_argument("--pinnings", help=f"where batches are pinned, comma-separated: {', '.join(data.PINNINGS)} "
                                      "(default: all three on a GPU and in --quick, else off)")
    p.add_argument("--steps", type=int, help="batches per epoch (default: as the training bench's)")
    p.add_argument("--sources", help=f"{', '.join(SOURCES)} or both (default both)")
    p.add_argument("--out", type=Path, default=Path("bench/results/loader_probe.json"))
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cpus = os.cpu_count() or 1
    if args.steps is not None and args.steps < 1:
        p.error(f"--steps takes a positive integer, got {args.steps}")
    args.size, args.batch, steps, args.rounds = SIZES["quick" if args.quick else device.type]
    args.steps = args.steps or steps
    try:
        counts = ([int(x) for x in args.workers.split(",")] if args.workers
                  else worker_counts(cpus, device.type == "cuda"))
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        p.error(f"--workers takes positive integers separated by commas, got {args.workers!r}")
    pinnings = choices(p, "pinnings", args.pinnings, data.PINNINGS,
                       data.PINNINGS if device.type == "cuda" or args.quick else ("off",))
    sources = choices(p, "sources", args.sources, SOURCES, SOURCES)
    host = machine.describe(device)
    print(f"the training data path alone on {device} ({machine.line(host)}): 500x375 JPEGs to {args.size} px, batch "
          f"{args.batch}, {args.steps} steps, median of {args.rounds} epochs after a first; 1st s: to an "
          "epoch's first batch")
    print(f"  {'source':<16}{'workers':>8}  {'pinning':<7}{'img/s':>10}{'1st s':>10}{'shutdown s':>12}")
    rows = []
    with tempfile.TemporaryDirectory(prefix="loader-probe-") as tmp:
        channel = photo_channel(Path(tmp), args.batch * args.steps, 6)
        paths = [path for path, _ in channel.samples]
        eval_preset = ClassificationPresetEval(args.size)
        train_size, _ = cache.plan("true", paths, 0, eval_preset)
        decode_once = {}
        for decoder in ("pillow", "default", "pillow", "default"):  # taking turns
            with pillow_only(decoder == "pillow"):
                train_cache = cache.decode_splits(paths, {}, eval_preset, cpus, train_size)["train"]
            decode_once.setdefault(decoder, []).append(train_cache.seconds)
        decode_once = {k: min(v) for k, v in decode_once.items()}
        for source in sources:
            for workers in counts:
                for pinning in pinnings:
                    rows.append(probe(channel, train_cache, source, workers, pinning, args, device))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "date": datetime.now(timezone.utc).date().isoformat(), "device": str(device), "machine": host, "cpus": cpus,
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None, "torch": torch.__version__,
        "image_size": args.size, "batch_size": args.batch, "steps": args.steps, "rounds": args.rounds,
        "quick": args.quick, "decode_once_s": decode_once, "rows": rows}, indent=2))
    print(f"decoding the {len(paths)} images once (cache-images, {cpus} threads, best of 2): "
          f"{decode_once['default']:.2f} s, through Pillow {decode_once['pillow']:.2f} s "
          f"({decode_once['pillow'] / decode_once['default']:.2f}x the time)")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
