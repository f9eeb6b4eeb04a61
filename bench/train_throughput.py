"""Training throughput: images/s of the real trainer pieces, end to end and on in-memory tensors,
against a naive configuration of the same trainer. Every ratio is measured side by side in one run.

Configurations (same `train_one_epoch`, same model, same optimizer):
  naive       fp32, NCHW, no data-loader workers, per-sample PIL transforms (a course notebook)
  fp32-nchw   our uint8 data path (tensor transforms, workers from the CPU count), fp32, NCHW
  default     what a job runs: decode once (cache-images), channels-last, autocast (bf16 on AMX),
              conv-gemm=auto (the convolutions timed faster as one matrix multiply run so),
              frozen-trunk=auto (a frozen backbone as one frozen trace)
  compiled    default with the hyperparameter compile=true (torch.compile); its first epoch
              includes compiling, reported as "compile s" (extra first-epoch time over default)
  int8-trunk  default with frozen-trunk=int8, frozen backbones on a CPU: the trunk in int8. A job's
              auto picks it where the int8 features stay close to fp32's (a trained backbone, as the
              frozen-accuracy part's); the bench's random-init backbones do not pass that check,
              so its default runs the float trace
  sample-crop default with the cached images' random crop and flip run image by image (torch's
              resize per image), where a job crops a batch in one call (train.batch_crop): same pixels
  uncached    default without decode-once: every epoch decodes the JPEGs in the workers
  gpu-decode  default without decode-once, JPEGs decoded a batch at a time on the device
              (gpu-decode=true); both on GPUs (and gpu-decode in --quick, to keep its path working)
  pin-thread, pin-main, pin-off   on GPUs, default with the batches pinned elsewhere than a job pins
              them (train.data.GPU_PINNING): in the data loader's pin_memory thread, in the training
              thread, or not at all
Measurements per (arch, freeze, config):
  synthetic   the training step on uint8 tensors already in memory (the model's own ceiling)
  end-to-end  train_one_epoch over 500x375 photo-like JPEG files, after a first epoch (workers warm)
  data        the same epoch's data path alone, no model: loader, batcher, copy to the device ("data",
              every configuration but naive). Where end to end falls short of both it and synthetic,
              the two do not overlap; where it is near data, the data path is the limit.
Both are medians over rounds (3; 2 in --quick) in which every configuration of a model takes turns,
and a ceiling's synthetic steps run half just before and half just after its own configuration's
end-to-end epoch, so that a ratio's two sides see the same spells of a noisy host; each row also
keeps the median of each round's own e2e/syn (`e2e_over_synthetic_by_round`), to show how far those
spells move it.
Roofline (bench.roofline): the model's GFLOP per training image, and the device's matrix multiply
rate in each precision, timed in the same rounds. "of mm" is a row's model FLOP/s end to end over
that rate; the 3x-naive target also prints the most any configuration in the row's precision could
reach against naive, were all its arithmetic to run at the multiply's rate.
Accuracy: resnet18 trained naive and default from scratch on the same shapes dataset (32 px, 1800
train / 600 valid images), for the same epochs and with a job's schedule, over ten seeds (mean,
run-to-run sd, standard error). A seed's naive run takes the default's order of samples and
draws each crop and flip from the same per-sample seed (train.data.EpochSampler): the two differ
in how they compute, not in what they see, and the difference is paired by seed. Frozen
accuracy: the same, with freeze=backbone on a backbone trained beforehand on other images of four
of the six shapes (no pretrained weights can be downloaded here); the default's frozen backbone
runs in int8 there (frozen-trunk=auto on a CPU).
Targets (issue 8): default end-to-end >= 0.85 x its synthetic rate; default >= 3x naive; default
valid accuracy >= naive. `--parts` runs one part alone. Writes bench/results/train_throughput.json.
A configuration that raises and is no one's synthetic ceiling (a GPU-only path, say) is printed as
FAILED with its error, left out of the later rounds and the table, and kept in the results file
("failed"); the others run to the end, and the exit status is 1.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import tempfile
import time
import traceback
from concurrent.futures import ProcessPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as V1

from bench import machine, roofline, stats
from bench.images import photo_like_jpegs
from bench.stacks import dump_stacks_every
from imgcls import quantize
from imgcls.models import create_model
from imgcls.presets import IMAGENET_MEAN, IMAGENET_STD, ClassificationPresetEval, ClassificationPresetTrain
from train import cache, data, device_decode, finetune, frozen_trunk, fused_norm
from train.engine import Batcher, choose_precision, evaluate, train_one_epoch
from train.hyperparams import Config
from train.job import auto_workers, calibration_batches, fuse_norms, gemm_convs, trace_trunk
from train.synthetic import make_dataset

E2E_TARGET, NAIVE_TARGET = 0.85, 3.0
PARTS = ("throughput", "accuracy", "frozen-accuracy")
PIN_CONFIGS = {f"pin-{mode}": mode for mode in data.PINNINGS}
CACHED = ("default", "compiled", "int8-trunk", "aten-norm", "sample-crop", *PIN_CONFIGS)  # the configurations that decode once, as a job does
CONFIGS = ("naive", "fp32-nchw", "default", "compiled", "int8-trunk", "aten-norm", "sample-crop", "uncached",
           "gpu-decode", *PIN_CONFIGS)
FREEZES = {"frozen": "backbone", "full": "none"}
GPU_TARGET, GPU_WAIT = 0.90, 0.05
PHOTO_CHUNK = 256
# image size, batch, steps per epoch, rounds. On a GPU a 32-image step of 128 px is over before the
# next batch's copy is queued: the GPU run trains at ImageNet's size and a batch that fills the device.
SIZES = {"quick": (32, 4, 2, 2), "cpu": (128, 32, 8, 3), "cuda": (224, 128, 20, 3)}


def build(arch, classes, freeze, channels_last, device, seed=0, backbone=None):
    """backbone: a state dict for every layer but the head (a pretrained backbone's stand-in)."""
    torch.manual_seed(seed)
    model = create_model(arch, classes)
    if backbone is not None:
        model.load_state_dict(backbone, strict=False)
    frozen = finetune.frozen_prefixes(model, freeze)
    finetune.apply_freeze(model, frozen)
    model.to(device, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    opt = finetune.make_optimizer("adamw", finetune.param_groups(model, 0.05), 0.002, 0.9, 1e-8)
    return model, frozen, opt


def job_convs(setup: Setup, model, batch: int, size: int) -> list[str]:
    """frozen-trunk, conv-gemm and fused-norm as a job sets them (auto; all off with compile=true) for the
    fast configurations (aten-norm: fused-norm=false); returns the convolutions conv-gemm swapped."""
    config, device, precision = setup.config, setup.device, setup.precision
    if not fast(config):
        return []
    cfg = Config(batch_size=batch, image_size=size, compile=config == "compiled",
                 frozen_trunk="int8" if config == "int8-trunk" else "auto",
                 fused_norm="false" if config == "aten-norm" else "auto")
    trace_trunk(cfg, model, device, precision, None, setup.calibration)
    swapped = gemm_convs(cfg, model, device, precision)
    fuse_norms(cfg, model, device, precision, None)
    return swapped


class NaiveDataset(Dataset):
    """What course notebooks do: open with PIL, transform each sample on PIL, ToTensor, Normalize.
    seed: take a job's (epoch, index) keys (train.data.EpochSampler) and draw each sample's crop and
    flip from its seed, as a job's loader does; the transforms then draw the job's boxes, which they
    resample through PIL instead of torch."""

    def __init__(self, samples, size: int, train: bool, seed: int | None = None):
        self.samples, self.seed = samples, seed
        steps = ([V1.RandomResizedCrop(size, scale=(0.25, 1.0)), V1.RandomHorizontalFlip()] if train
                 else [V1.Resize(round(size / 0.875)), V1.CenterCrop(size)])
        self.transform = V1.Compose([*steps, V1.ToTensor(), V1.Normalize(IMAGENET_MEAN, IMAGENET_STD)])

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, key):
        if self.seed is not None:
            epoch, key = key
            data.seed_sample(self.seed, epoch, key)
        path, label = self.samples[key]
        with Image.open(path) as img:
            return self.transform(img.convert("RGB")), label


class Setup:
    """One configuration's loaders, batcher and precision for a channel pair. same_draws: naive
    trains on the job's order of samples with the job's crops and flips (the accuracy parts), so
    that a seed's naive and default runs differ only in how they compute."""

    def __init__(self, config: str, train_ch, valid_ch, size: int, batch: int, workers: int, device, seed=0,
                 same_draws: bool = False):
        self.config, self.device = config, device
        self.channels_last = fast(config)
        self.precision = choose_precision("auto" if fast(config) else "fp32", device)
        preset = ClassificationPresetTrain(size, "light")
        eval_preset = ClassificationPresetEval(size)
        if config == "naive":
            if same_draws:
                self.train = data.loader(NaiveDataset(train_ch.samples, size, True, seed),
                                         data.EpochSampler(len(train_ch.samples), seed, shuffle=True), batch,
                                         workers=0, drop_last=True)
            else:
                g = torch.Generator().manual_seed(seed)
                self.train = DataLoader(NaiveDataset(train_ch.samples, size, True), batch, shuffle=True,
                                        generator=g, drop_last=True)
            self.valid = DataLoader(NaiveDataset(valid_ch.samples, size, False), 2 * batch) if valid_ch else None
            self.batcher = Batcher(device, preset.normalize, False)  # its float batches, normalized by PIL's path, only move
            self.train_batcher = self.batcher
            self.cache_seconds = 0.0
            return
        caches = {}
        if config in CACHED:  # what a job does before its first epoch (cache-images)
            evals = {"valid": [p for p, _ in valid_ch.samples]} if valid_ch else {}
            train_paths = [p for p, _ in train_ch.samples]
            train_size, _ = cache.plan("true", train_paths, sum(map(len, evals.values())), eval_preset)
            caches = cache.decode_splits(train_paths, evals, eval_preset, os.cpu_count() or 1, train_size)
        self.cache_seconds = sum(c.seconds for c in caches.values())
        loader_pins, batcher_pins = data.pinning(PIN_CONFIGS.get(config, data.GPU_PINNING), device.type == "cuda")
        self.batcher = Batcher(device, preset.normalize, self.channels_last, pin=batcher_pins)
        self.train_batcher = self.batcher
        self.calibration = lambda: calibration_batches(train_ch, eval_preset, self.batcher, seed, workers)
        self.valid = data.make_loader(valid_ch, data.identity if caches else eval_preset, 2 * batch, shuffle=False,
                                      seed=seed, workers=workers, pin_memory=loader_pins,
                                      cache=caches.get("valid")) if valid_ch else None
        if config == "gpu-decode":
            self.train = device_decode.make_loader(train_ch, batch, shuffle=True, seed=seed, workers=workers,
                                                   drop_last=True, run_ahead=True)
            self.train_batcher = device_decode.DeviceDecoder(device, preset, seed, self.channels_last)
            return
        self.train = data.make_loader(train_ch, preset, batch, shuffle=True, seed=seed, workers=workers,
                                      pin_memory=loader_pins, drop_last=True, cache=caches.get("train"),
                                      run_ahead=True, by_batch=config != "sample-crop",
                                      normalize=preset if device.type == "cpu" else None)

    def data_epoch(self, epoch: int) -> float:
        """The data path alone (data_path_rate) of this configuration's training loader. Set beside the
        synthetic rate, it tells whether a slow end to end is the data path's or their overlap's."""
        return data_path_rate(self.train, self.train_batcher, epoch)[0]

    def epoch(self, model, frozen, opt, epoch: int, sched=None):
        """sched: the run's schedule, stepped per batch; None holds the rate (throughput runs)."""
        scaler = torch.amp.GradScaler(self.device.type) if self.precision.scaler else None
        sched = sched or finetune.warmup_cosine(opt, 10**6, 0)
        waits = []
        result = train_one_epoch(model, data.epoch_batches(self.train, epoch), self.train_batcher,
                                 nn.CrossEntropyLoss(), opt, sched, self.precision, scaler, 1, lambda: finetune.set_train_mode(model, frozen),
                                 on_step=lambda step, waited, *_: waits.append(waited) if step == 0 else None)
        # the wait for an epoch's first batch: the loader starting over, not keeping up
        self.first_wait = waits[0] / result.seconds if waits and result.seconds else 0.0
        return result


def data_path_rate(loader, batcher, epoch: int) -> tuple[float, float]:
    """(images/s of one epoch of `loader` through `batcher` to the device (decode, crop, collate,
    copy, normalize), no model; seconds to its first batch)."""
    images, first, start = 0, None, time.perf_counter()
    for batch, labels in data.epoch_batches(loader, epoch):
        first = first or time.perf_counter() - start
        x, _ = batcher(batch, labels)
        images += x.shape[0]
    if batcher.device.type == "cuda":
        torch.cuda.synchronize(batcher.device)
    return images / (time.perf_counter() - start), first or 0.0


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


def setup_fuses(device) -> bool:
    """Whether the default fuses batch norm here (train.fused_norm): bf16 on a CPU with a compiler."""
    precision = choose_precision("auto", device)
    return fused_norm.why_not("auto", device, precision.name, True, False) is None


def fast(config: str) -> bool:
    """Every configuration but the fp32 ones: channels-last, autocast."""
    return config not in ("naive", "fp32-nchw")


def choices(p, name: str, given: str | None, allowed, default) -> list:
    """A comma-separated option's names, each one of `allowed`; `default` when it is not given."""
    if given is None:
        return list(default)
    picked = [x.strip() for x in given.split(",") if x.strip()]
    if not picked or set(picked) - set(allowed):
        p.error(f"--{name} takes some of {', '.join(allowed)}, comma-separated, got {given!r}")
    return picked


def release_loaders() -> None:
    """Shut the finished configurations' loader workers down now, in this process. A Setup sits in
    reference cycles, so without a collection its persistent workers live on, and the next loader's
    workers, forked from this process, inherit them and try to shut them down as their own ("can
    only test a child process", seen with one worker per loader)."""
    gc.collect()


def settle(loader, timeout: float = 60.0) -> float:
    """Wait until a RunAhead's workers hold every batch they were asked for; the seconds waited.
    Between a configuration's turn and the next one's, its workers go on into its next epoch
    (prefetch): on 2 cores one fp32-nchw worker decoding JPEGs ran the default's end to end,
    measured next, at 0.63 of synthetic where the same default measured after sample-crop ran
    at 0.86 (resnet18 frozen). A job has one loader; the bench's turns must not share the cores.
    Reads the DataLoader iterator's queue and its count of batches asked for (private, so any
    other shape of it returns at once)."""
    it = getattr(loader, "_batches", None)
    outstanding, queue = getattr(it, "_tasks_outstanding", None), getattr(it, "_data_queue", None)
    start = time.perf_counter()
    if outstanding is None or queue is None:
        return 0.0
    while time.perf_counter() - start < timeout:
        try:
            if queue.qsize() >= it._tasks_outstanding:
                break
        except NotImplementedError:  # no qsize on this platform's queues
            break
        time.sleep(0.002)
    return time.perf_counter() - start


def synthetic_epoch(setup: Setup, model, frozen, opt, size, batch, steps, classes):
    """The training step of `setup`'s model and precision on uint8 tensors already in memory."""
    return train_one_epoch(model, InMemory(batch, steps, size, classes), setup.batcher, nn.CrossEntropyLoss(), opt,
                           finetune.warmup_cosine(opt, 10**6, 0), setup.precision, None, 1,
                           lambda: finetune.set_train_mode(model, frozen))


def _photos(count: int, seed: int) -> list[bytes]:
    return photo_like_jpegs(count, seed=seed)


def photo_channel(root: Path, count: int, classes: int) -> data.Channel:
    """count photo-like JPEGs in `classes` folders, made in chunks of PHOTO_CHUNK, each from its own
    seed, in parallel: a GPU run's 2560 would take 40 s on one core (15 ms each here). The chunking,
    not the CPU count, fixes the images."""
    chunks = [min(PHOTO_CHUNK, count - start) for start in range(0, count, PHOTO_CHUNK)]
    with ProcessPoolExecutor(max(1, min(len(chunks), os.cpu_count() or 1))) as pool:
        jpegs = [j for chunk in pool.map(_photos, chunks, range(len(chunks))) for j in chunk]
    for i, jpeg in enumerate(jpegs):
        folder = root / "train" / f"class_{i % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{i:05d}.jpg").write_bytes(jpeg)
    return data.scan_channel("train", root / "train", workers=os.cpu_count() or 1)


def throughput(args, device, workers, work: Path, failures: list | None = None) -> list[dict]:
    """failures: as measure() takes it."""
    classes = 6
    channel = photo_channel(work / "photos", args.batch * args.steps, classes)
    rows = []
    for arch in args.archs.split(","):
        for freeze in args.freeze:
            configs = ("naive", "fp32-nchw", "default") + (("compiled",) if arch in args.compile_archs else ())
            if freeze == "backbone" and device.type == "cpu" and quantize.available():
                configs += ("int8-trunk",)
            if freeze == "none" and setup_fuses(device):  # what fused-norm gains, side by side
                configs += ("aten-norm",)
            if device.type == "cpu":  # where the crop runs in the training process
                configs += ("sample-crop",)
            if device.type == "cuda":
                configs += ("uncached", "gpu-decode")
                configs += tuple(c for c, mode in PIN_CONFIGS.items() if mode != data.GPU_PINNING)
            elif args.quick:
                configs += ("gpu-decode",)
            if args.configs:
                configs = tuple(c for c in configs if c in args.configs)
            rows += measure(args, device, workers, channel, classes, arch, freeze, configs, failures)
            release_loaders()
    for r in rows:
        naive = next((b for b in rows if b["arch"] == r["arch"] and b["freeze"] == r["freeze"]
                      and b["config"] == "naive"), None)  # None: --configs left it out
        r["vs_naive"] = r["end_to_end_img_s"] / naive["end_to_end_img_s"] if naive else None
        # the most any configuration in this precision could reach against naive (bench.roofline)
        r["most_vs_naive"] = r["most_img_s"] / naive["end_to_end_img_s"] if naive and r["most_img_s"] else None
        default = next((b for b in rows if b["arch"] == r["arch"] and b["freeze"] == r["freeze"]
                        and b["config"] == "default"), None)
        if r["config"] == "compiled" and default:
            r["compile_s"] = r["first_epoch_s"] - default["first_epoch_s"]
        if r["config"] in ("compiled", "aten-norm", "sample-crop") and default:
            r["vs_default"] = r["end_to_end_img_s"] / default["end_to_end_img_s"]
    return rows


def measure(args, device, workers, channel, classes, arch, freeze, configs,
            failures: list | None = None) -> list[dict]:
    """One model per configuration, measured in rounds that take turns: each round runs every
    configuration's end-to-end epoch, the synthetic ceilings (fp32 NCHW's, the default's) around their
    own configurations' ones, and each figure is the median over the rounds. On a noisy host,
    measurements minutes apart moved a ratio by 0.2 or more; taking turns exposes every
    configuration to the same slow and fast spells.
    failures: where given, a configuration that is no one's ceiling and raises (setting up or in a
    round) is reported there and on stdout and left out of the later rounds and the rows, and the
    others go on; without it, or for a ceiling, the error ends the run."""
    mode = "frozen" if freeze == "backbone" else "full"  # the name rows and printouts give `freeze`
    # The ceilings run eagerly on the models of fp32-nchw and default: naive shares fp32-nchw's model,
    # layout and precision; compiled (does compiling raise it?) and the decoding variants share the default's.
    # int8-trunk and aten-norm have their own: their kernels differ.
    own = {"naive": "fp32-nchw", "fp32-nchw": "fp32-nchw", "int8-trunk": "int8-trunk", "aten-norm": "aten-norm"}
    ceiling = {c: own.get(c, "default") for c in configs}
    ceiling = {c: m if m in configs else c for c, m in ceiling.items()}  # --configs left that model out
    ceilings = sorted(set(ceiling.values()))

    def failed(config: str, stage: str, error: Exception) -> None:
        if failures is None or config in ceilings:
            raise error
        failures.append(failure(arch, mode, config, stage, error))
        runs.pop(config, None)

    runs = {}
    for config in configs:
        try:
            setup = Setup(config, channel, None, args.size, args.batch, workers[config], device)
            model, frozen, opt = build(arch, classes, freeze, setup.channels_last, device)
            gemm = job_convs(setup, model, args.batch, args.size)
            run_model = torch.compile(model) if config == "compiled" else model
            first = setup.epoch(run_model, frozen, opt, 0)  # workers start, allocator warms, compiling
        except Exception as error:  # noqa: BLE001 - reported by failed(), or raised again
            failed(config, "setting up", error)
            continue
        runs[config] = {"setup": setup, "model": model, "run_model": run_model, "frozen": frozen, "opt": opt,
                        "first": first, "gemm": gemm, "e2e": [], "wait": [], "first_wait": [], "data": [],
                        "synthetic": []}

    def synthetic(c: str, steps: int):
        r = runs[c]
        return synthetic_epoch(r["setup"], r["model"], r["frozen"], r["opt"], args.size, args.batch, steps, classes)

    # The model's arithmetic per image, and the device's multiply rate in each precision trained in,
    # timed in the same rounds (bench.roofline).
    gflop = roofline.step_gflop(build(arch, classes, freeze, False, device)[0], args.size)
    precisions = sorted({r["setup"].precision.name for r in runs.values()})
    matmul = {p: [] for p in precisions}
    for c in ceilings:
        synthetic(c, 2)  # warm-up: allocator, oneDNN kernels
    for epoch in range(1, args.rounds + 1):
        for config in list(runs):  # a copy: a configuration that fails leaves runs
            try:
                one_round(runs[config], config in ceilings, epoch, args.steps, lambda n, c=config: synthetic(c, n))
            except Exception as error:  # noqa: BLE001 - reported by failed(), or raised again
                failed(config, f"round {epoch}", error)
        for p in precisions:
            matmul[p].append(roofline.matmul_rate(device, p, *roofline.sizes(device, args.quick)))
        print_round(f"{arch} {mode}", epoch, args.rounds, runs, ceiling)
    rows = []
    for config in runs:
        r = runs[config]
        synthetic_rounds = runs[ceiling[config]]["synthetic"]
        ceiling_rate, e2e = statistics.median(synthetic_rounds), statistics.median(r["e2e"])
        # each round's own e2e/syn, a minute apart instead of rounds apart: how far a host's spells
        # move the ratio (reported beside the target's ratio of medians, which it does not replace)
        by_round = statistics.median(e / s for e, s in zip(r["e2e"], synthetic_rounds, strict=True))
        precision = r["setup"].precision.name
        int8 = bool(getattr(r["model"], "frozen_trunk_int8", False))
        # an int8 trunk does its arithmetic outside the precision's multiply: no bound from it
        rate = None if int8 else statistics.median(matmul[precision])
        flops = e2e * gflop
        rows.append({"arch": arch, "freeze": mode, "config": config,
                     "precision": precision, "channels_last": r["setup"].channels_last,
                     "workers": workers[config], "rounds": args.rounds,
                     "synthetic_img_s": ceiling_rate, "end_to_end_img_s": e2e,
                     "e2e_over_synthetic": e2e / ceiling_rate, "e2e_over_synthetic_by_round": by_round,
                     "end_to_end_rounds": r["e2e"], "synthetic_rounds": synthetic_rounds,
                     "data_img_s": statistics.median(r["data"]) if r["data"] else None, "data_rounds": r["data"],
                     "data_wait": statistics.median(r["wait"]), "first_batch_wait": statistics.median(r["first_wait"]),
                     "decode_once_s": r["setup"].cache_seconds,
                     "first_epoch_s": r["first"].seconds, "gemm_convs": r["gemm"],
                     "fused_norms": sum(isinstance(m, fused_norm.FusedBatchNorm2d) for m in r["model"].modules()),
                     "batch_crop": getattr(getattr(r["setup"].train, "dataset", None), "crops_batches", False),
                     "frozen_trunk": list(getattr(r["model"], "frozen_trunk", ())), "int8_trunk": int8,
                     "model_gflop_per_image": gflop, "model_gflop_s": flops,
                     "matmul_gflop_s": rate, "matmul_rounds": None if int8 else matmul[precision],
                     "of_matmul": None if int8 else flops / rate,
                     "most_img_s": None if int8 else rate / gflop})
        # all of a row that a run stopped before its table still needs (GPU runs have ended so)
        print(f"  measured {arch} {rows[-1]['freeze']} {config}: {e2e:.1f} img/s end to end "
              f"({', '.join(f'{x:.1f}' for x in r['e2e'])}), synthetic {ceiling_rate:.1f} "
              f"({', '.join(f'{x:.1f}' for x in synthetic_rounds)}), e2e/syn "
              f"{e2e / ceiling_rate:.2f} (each round's own, median {by_round:.2f}), data wait "
              f"{rows[-1]['data_wait']:.1%} (first batch {rows[-1]['first_batch_wait']:.1%})", flush=True)
    return rows


def one_round(r: dict, owns: bool, epoch: int, steps: int, synthetic) -> None:
    """A configuration's turn in round `epoch`: its end-to-end epoch, then its data path's, and where
    it is a ceiling (`owns`), its synthetic steps around them; synthetic(n) runs n steps."""
    # A ceiling's own configuration runs half its synthetic steps just before its end-to-end epoch
    # and half just after (A-B-A): a host's spell, which lasts seconds, then weighs on both sides
    # of e2e/syn alike. Measured once a round after every configuration, the same ceiling's
    # e2e/syn ranged 0.61-1.29 over eight rounds, 0.79-1.07 so (resnet18 full, model-207 host).
    half = steps // 2
    sides = [synthetic(half)] if owns and half else []
    # a job's epochs, one after the other: the end-to-end one, then the data path's
    e2e = r["setup"].epoch(r["run_model"], r["frozen"], r["opt"], 2 * epoch - 1)
    if owns:
        sides.append(synthetic(steps - half))
        r["synthetic"].append(sum(x.samples for x in sides) / sum(x.seconds for x in sides))
    r["e2e"].append(e2e.images_per_second)
    r["wait"].append(e2e.data_wait_fraction)
    r["first_wait"].append(r["setup"].first_wait)
    if r["setup"].config != "naive":  # its data path is the PIL one in the training process: no question there
        r["data"].append(r["setup"].data_epoch(2 * epoch))
    settle(r["setup"].train)


def failure(arch: str, mode: str, config: str, stage: str, error: Exception) -> dict:
    """A configuration's error as the results file keeps it, printed where the rounds print (a device
    reply keeps only its output's tail; the traceback goes to stderr)."""
    frame = traceback.extract_tb(error.__traceback__)[-1] if error.__traceback__ else None
    where = f"{Path(frame.filename).name}:{frame.lineno} in {frame.name}" if frame else "unknown"
    first_line = next(iter(str(error).strip().splitlines()), "")[:300]  # CUDA's errors run to many lines
    found = {"arch": arch, "freeze": mode, "config": config, "stage": stage,
             "error": f"{type(error).__name__}: {first_line}".rstrip(": "), "where": where}
    print(f"  FAILED {failure_line(found)}; left out of the later rounds and the table", flush=True)
    traceback.print_exception(error)
    return found


def failure_line(found: dict) -> str:
    return f"{found['arch']} {found['freeze']} {found['config']} ({found['stage']}): {found['error']} (at {found['where']})"


def print_round(model: str, number: int, rounds: int, runs: dict, ceiling: dict) -> None:
    """Each configuration's figures of the round just ended, side by side with its ceiling's of the
    same round: a run its limit ends in a later round still shows a ratio from one run (three GPU runs
    have ended before their table, and a model's rows print only after its last round)."""
    for config, r in runs.items():
        syn = runs[ceiling[config]]["synthetic"][-1]
        data_rate = f", data {r['data'][-1]:.1f} img/s" if r["data"] else ""
        print(f"  round {number}/{rounds} {model} {config}: {r['e2e'][-1]:.1f} img/s end to end, "
              f"synthetic {syn:.1f}, e2e/syn {r['e2e'][-1] / syn:.2f}{data_rate}, data wait {r['wait'][-1]:.1%}",
              flush=True)


def schedule(opt, epochs: int, steps: int):
    """A job's schedule (train.job, default warmup-epochs): warm-up, then cosine decay over every epoch.
    At a held rate the last epoch's weights, and so the valid accuracy, swing from seed to seed."""
    return finetune.warmup_cosine(opt, epochs * steps, round(Config().warmup_epochs * steps))


def shapes(work: Path, name: str, args, classes: int, seed: int) -> tuple[data.Channel, data.Channel]:
    root = work / name
    if not root.exists():
        make_dataset(root, per_class=args.acc_images, size=args.acc_size * 5 // 4, classes=classes,
                     test_per_class=args.acc_valid, seed=seed)
    return (data.scan_channel("train", root / "train", workers=2), data.scan_channel("test", root / "test", workers=2))


def pretrained_backbone(args, device, workers, work: Path) -> dict:
    """A pretrained backbone's stand-in (ImageNet weights cannot be downloaded here): resnet18 trained
    from scratch, by the default configuration, on other images of four of the six shapes. A frozen
    backbone's head then learns the six on features that know four of them."""
    train_ch, valid_ch = shapes(work, "shapes-pretrain", args, 4, seed=2)
    setup = Setup("default", train_ch, valid_ch, args.acc_size, 32, workers["default"], device, 0)
    model, frozen, opt = build("resnet18", 4, "none", setup.channels_last, device, seed=0)
    job_convs(setup, model, 32, args.acc_size)
    epochs = args.acc_epochs
    sched = schedule(opt, epochs, len(setup.train))
    for epoch in range(epochs):
        setup.epoch(model, frozen, opt, epoch, sched)
    frozen_trunk.detach(model)
    result = evaluate(model, setup.valid, setup.batcher, setup.precision, 1, 4)
    print(f"  pretrained backbone: {result.accuracy:.3f} on its four shapes after {epochs} epochs", flush=True)
    return {k: v.cpu() for k, v in model.state_dict().items() if not k.startswith("fc.")}


def accuracy(args, device, workers, work: Path, freeze: str = "none", backbone: dict | None = None) -> dict:
    """resnet18, naive and default, same data and epochs, over a few seeds (model init, data order and
    augmentation): the mean valid accuracy of each, since one seed is noise here. freeze=none trains
    from scratch; freeze=backbone trains the head on `backbone`."""
    train_ch, valid_ch = shapes(work, "shapes", args, 6, seed=1)
    out = {"arch": "resnet18", "freeze": freeze, "epochs": args.acc_epochs, "train_images": len(train_ch.samples),
           "valid_images": len(valid_ch.samples), "image_size": args.acc_size, "seeds": args.acc_seeds}
    for config in ("naive", "default"):
        runs = []
        for seed in args.acc_seeds:
            setup = Setup(config, train_ch, valid_ch, args.acc_size, 32, workers[config], device, seed,
                          same_draws=True)
            model, frozen, opt = build("resnet18", 6, freeze, setup.channels_last, device, seed=seed,
                                       backbone=backbone)
            job_convs(setup, model, 32, args.acc_size)
            sched = schedule(opt, args.acc_epochs, len(setup.train))
            start = time.perf_counter()
            for epoch in range(args.acc_epochs):
                setup.epoch(model, frozen, opt, epoch, sched)
            seconds = time.perf_counter() - start + setup.cache_seconds
            int8_trunk = bool(getattr(model, "frozen_trunk_int8", False))
            # As a job reports it: the model's own modules in the job's precision, as a GPU or bf16 server
            # runs it; with the int8 trunk also as trained (a CPU server in int8 computes the same features).
            through_trunk = evaluate(model, setup.valid, setup.batcher, setup.precision, 1, 6) if int8_trunk else None
            frozen_trunk.detach(model)
            result = evaluate(model, setup.valid, setup.batcher, setup.precision, 1, 6)
            runs.append({"seed": seed, "valid_acc": result.accuracy, "valid_loss": result.loss,
                         "train_seconds": seconds, "int8_trunk": int8_trunk,
                         "valid_acc_int8_trunk": through_trunk.accuracy if through_trunk else None})
            print(f"  accuracy {freeze} {config} seed {seed}: {result.accuracy:.3f}"
                  + (f" ({through_trunk.accuracy:.3f} through the int8 trunk)" if through_trunk else "")
                  + f" after {args.acc_epochs} epochs ({seconds:.0f} s)", flush=True)
            del setup
            release_loaders()
        accs = [r["valid_acc"] for r in runs]
        out[config] = {"valid_acc": statistics.fmean(accs), "sd": statistics.stdev(accs) if len(accs) > 1 else None,
                       "train_seconds": statistics.fmean(r["train_seconds"] for r in runs), "runs": runs}
        int8_accs = [r["valid_acc_int8_trunk"] for r in runs if r["int8_trunk"]]
        out[config]["valid_acc_int8_trunk"] = statistics.fmean(int8_accs) if int8_accs else None
    out["default_minus_naive"] = out["default"]["valid_acc"] - out["naive"]["valid_acc"]
    # A seed's two runs train on the same images, crops and flips in the same order (same_draws), so
    # the difference is taken seed by seed: what is left of it is how they compute. With each drawing
    # its own crops, the draws alone moved naive's mean over thirty seeds by 0.004 (docs/benchmarks.md).
    paired = list(zip(out["default"]["runs"], out["naive"]["runs"], strict=True))
    out["difference_sd"], out["difference_se"] = stats.sd_se([d["valid_acc"] - n["valid_acc"] for d, n in paired])
    through = [d["valid_acc_int8_trunk"] - n["valid_acc"] for d, n in paired if d["int8_trunk"]]
    out["int8_trunk_minus_naive"] = statistics.fmean(through) if through else None
    out["int8_trunk_difference_se"] = stats.sd_se(through)[1]
    return out


def _ratio(value: float, met: bool, threshold: float) -> str:
    """A ratio to two places, or to as many more as it takes not to round it onto the other side of
    the threshold (0.8497 against 0.85 prints 0.8497, not a missed 0.85)."""
    places = 2
    while (round(value, places) >= threshold) != met and places < 6:
        places += 1
    return f"{value:.{places}f}"


def _target(target: str, value: float, met: bool, shown: str) -> dict:
    return {"target": target, "value": value, "met": met, "shown": shown}


def targets(rows: list[dict], accs: list[dict], on_gpu: bool = False) -> list[dict]:
    found = []
    for r in rows:
        if r["config"] not in ("default", "int8-trunk"):
            continue
        name = f"{r['arch']} {r['freeze']}" + (" int8-trunk" if r["config"] == "int8-trunk" else "")
        e2e, met = r["e2e_over_synthetic"], r["e2e_over_synthetic"] >= E2E_TARGET
        found.append(_target(f"{name}: end-to-end >= {E2E_TARGET} x synthetic", e2e, met, _ratio(e2e, met, E2E_TARGET)))
        if r["vs_naive"] is None:
            continue
        most = (f" (at most {r['most_vs_naive']:.2f} at this device's {r['precision']} multiply rate)"
                if r["most_vs_naive"] else "")
        met = r["vs_naive"] >= NAIVE_TARGET
        found.append(_target(f"{name}: default >= {NAIVE_TARGET:g} x naive", r["vs_naive"], met,
                             _ratio(r["vs_naive"], met, NAIVE_TARGET) + most))
    for acc in accs:
        mode = "frozen backbone" if acc["freeze"] == "backbone" else "full"
        se = acc["difference_se"]
        found.append(_target(f"resnet18 {mode}, {acc['epochs']} epochs, {len(acc['seeds'])} seeds: default mean "
                             "valid accuracy >= naive", acc["default_minus_naive"], acc["default_minus_naive"] >= 0,
                             f"{acc['default']['valid_acc']:.3f} vs {acc['naive']['valid_acc']:.3f} "
                             f"({acc['default_minus_naive']:+.4f}"
                             + (f", standard error {se:.4f}, paired by seed)" if se is not None else ")")))
    for r in rows:  # the GPU target: JPEGs decoded every epoch (no decode-once) keep up with the model
        if on_gpu and r["config"] in ("uncached", "gpu-decode"):
            name = f"GPU {r['arch']} {r['freeze']} {r['config']}"
            e2e, met = r["e2e_over_synthetic"], r["e2e_over_synthetic"] >= GPU_TARGET
            found.append(_target(f"{name}: end-to-end >= {GPU_TARGET} x synthetic", e2e, met,
                                 _ratio(e2e, met, GPU_TARGET)))
            found.append(_target(f"{name}: data wait < {GPU_WAIT:.0%} of step time", r["data_wait"],
                                 r["data_wait"] < GPU_WAIT, f"{r['data_wait']:.1%}"))
    return found


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run that keeps the benchmark working")
    p.add_argument("--archs", default="resnet18,resnet50")
    p.add_argument("--compile-archs", default="resnet18",
                   help="archs that also run compiled (compile=true); compiling takes minutes on few cores")
    p.add_argument("--out", type=Path, default=Path("bench/results/train_throughput.json"))
    p.add_argument("--parts", default=",".join(PARTS),
                   help=f"which parts to run, comma-separated: {', '.join(PARTS)}")
    p.add_argument("--acc-seeds", help="seeds of the accuracy runs, comma-separated (default 3 to 12)")
    for name, i in (("size", 0), ("batch", 1), ("steps", 2), ("rounds", 3)):
        p.add_argument(f"--{name}", type=int, help=f"throughput {name} (default: " + ", ".join(
            f"{v[i]} {k}" for k, v in SIZES.items()) + ")")
    p.add_argument("--freeze", default="frozen,full",
                   help="throughput: frozen backbone, full fine-tuning, or both (frozen,full)")
    p.add_argument("--configs", help="throughput: only those of these configurations, comma-separated, that run "
                                     f"on this device (default: all of them; the names: {', '.join(CONFIGS)})")
    p.add_argument("--stacks", type=float, metavar="SECONDS",
                   help="write every thread's Python stack to stderr every SECONDS (where a run that outlives its "
                        "work waits: two GPU runs have, after their last row)")
    args = p.parse_args()
    if args.stacks is not None:
        if args.stacks <= 0:
            p.error(f"--stacks takes a positive number of seconds, got {args.stacks:g}")
        dump_stacks_every(args.stacks)
    freezes = [x.strip() for x in args.freeze.split(",") if x.strip()]
    if not freezes or set(freezes) - set(FREEZES):
        p.error(f"--freeze takes frozen, full or both, got {args.freeze!r}")
    args.freeze = [FREEZES[x] for x in dict.fromkeys(freezes)]
    args.configs = choices(p, "configs", args.configs, CONFIGS, [])
    args.parts = {x.strip() for x in args.parts.split(",") if x.strip()}
    if not args.parts or args.parts - set(PARTS):
        p.error(f"--parts takes some of {', '.join(PARTS)}, got {','.join(sorted(args.parts)) or 'nothing'}")
    args.compile_archs = [a.strip() for a in args.compile_archs.split(",") if a.strip()]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    defaults = SIZES["quick" if args.quick else device.type]
    for name, default in zip(("size", "batch", "steps", "rounds"), defaults, strict=True):
        if getattr(args, name) is None:
            setattr(args, name, default)
        elif getattr(args, name) < (2 if name == "batch" else 1):  # a batch of one breaks BatchNorm
            p.error(f"--{name} takes a positive integer{' of at least 2' if name == 'batch' else ''}, "
                    f"got {getattr(args, name)}")
    # Small images and many seeds: from scratch, one run's valid accuracy swings by several points,
    # and a mean over ten seeds is what can tell a precision's effect from that.
    args.acc_size, args.acc_images, args.acc_valid, args.acc_epochs = (32, 8, 2, 1) if args.quick else (32, 300, 100, 10)
    try:
        args.acc_seeds = ([int(x) for x in args.acc_seeds.split(",")] if args.acc_seeds
                          else [3, 4] if args.quick else list(range(3, 13)))
    except ValueError:
        p.error(f"--acc-seeds takes integers separated by commas, got {args.acc_seeds!r}")
    torch.backends.cudnn.benchmark = True  # as a job sets it on a GPU (train.job): fixed shapes
    # As a job picks them (num-workers=auto): none for naive, fewer where the images are decoded once.
    cpus, on_gpu = os.cpu_count() or 1, device.type == "cuda"
    workers = {c: 0 if c == "naive" else auto_workers(cpus, 1, on_gpu, cached=c in CACHED)
               for c in CONFIGS}
    # A configuration that fails (a GPU-only path, say) costs its own rows, not the run's: a device
    # lease has time for one run. The exit status still says so.
    failures: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        rows = throughput(args, device, workers, Path(tmp), failures) if "throughput" in args.parts else []
        acc = accuracy(args, device, workers, Path(tmp)) if "accuracy" in args.parts else None
        frozen_acc = (accuracy(args, device, workers, Path(tmp), "backbone",
                               pretrained_backbone(args, device, workers, Path(tmp)))
                      if "frozen-accuracy" in args.parts else None)
    met = targets(rows, [a for a in (acc, frozen_acc) if a], on_gpu=device.type == "cuda")
    host = machine.describe(device)

    if rows:
        print_rows(args, device, host, workers, rows)
    for a in (acc, frozen_acc):
        if a:
            print_accuracy(a)
    print("\ntargets")
    for t in met:
        print(f"  {'met    ' if t['met'] else 'NOT met'}  {t['target']}: {t['shown']}")
    for f in failures:
        print(f"  FAILED   {failure_line(f)}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "device": str(device),
        "machine": host, "cpus": os.cpu_count(), "torch": torch.__version__, "image_size": args.size,
        "batch_size": args.batch,
        "steps": args.steps, "rounds": args.rounds, "workers": workers, "quick": args.quick,
        "parts": sorted(args.parts), "rows": rows, "accuracy": acc, "frozen_accuracy": frozen_acc,
        "targets": met, "failed": failures}, indent=2))
    print(f"\nwritten to {args.out}")
    if failures:
        raise SystemExit(f"{len(failures)} configuration(s) failed; their errors are above and in {args.out}")


def print_rows(args, device, host: dict, workers, rows: list[dict]) -> None:
    """host: machine.describe()'s, as the results file records it."""
    print(f"\ntraining throughput, {device} ({machine.line(host)}), "
          f"500x375 JPEGs cropped to {args.size}px, batch {args.batch}, {args.steps} steps, median of {args.rounds} "
          f"rounds taking turns, loader workers "
          f"{', '.join(f'{c} {n}' for c, n in workers.items())}")
    rates = {}
    for r in rows:
        if r["matmul_gflop_s"]:
            rates.setdefault(r["precision"], []).append(r["matmul_gflop_s"])
    print("matrix multiply rate (bench.roofline; median of each model's rounds): "
          + ", ".join(f"{p} {statistics.median(v):.0f} GFLOP/s" for p, v in sorted(rates.items())))
    print("model GFLOP per training image: " + ", ".join(sorted({
        f"{r['arch']} {r['freeze']} {r['model_gflop_per_image']:.2f}" for r in rows})))
    header = f"{'arch':<10}{'mode':<8}{'config':<13}{'prec':<10}{'synthetic':>11}{'end-to-end':>12}{'e2e/syn':>9}" \
             f"{'data':>9}{'vs naive':>10}{'wait':>7}{'1st':>6}{'GFLOP/s':>9}{'of mm':>7}"
    print(header)
    print("-" * len(header))
    for r in rows:
        compiled = (f"   ({r['vs_default']:.2f}x default after {r['compile_s']:.0f} s compiling)"
                    if r["config"] == "compiled" else
                    f"   ({r['vs_default']:.2f}x default)" if r.get("vs_default") else "")
        # the int8 trunk runs int8 under the step's autocast; the rest of the model in r["precision"]
        precision = f"int8/{r['precision']}" if r["int8_trunk"] else r["precision"]
        data = f"{r['data_img_s']:.1f}" if r["data_img_s"] else "-"
        vs_naive = f"{r['vs_naive']:.2f}" if r["vs_naive"] else "-"
        share = f"{r['of_matmul']:.2f}" if r["of_matmul"] else "-"  # of the multiply rate (bench.roofline)
        print(f"{r['arch']:<10}{r['freeze']:<8}{r['config']:<13}{precision:<10}{r['synthetic_img_s']:>11.1f}"
              f"{r['end_to_end_img_s']:>12.1f}{r['e2e_over_synthetic']:>9.2f}{data:>9}{vs_naive:>10}"
              f"{r['data_wait']:>7.2f}{r['first_batch_wait']:>6.2f}{r['model_gflop_s']:>9.0f}{share:>7}{compiled}")


def print_accuracy(acc: dict) -> None:
    mode = "frozen backbone (a backbone trained on four of the shapes)" if acc["freeze"] == "backbone" else "full"
    print(f"\naccuracy ({acc['arch']} {mode}, {acc['epochs']} epochs, {acc['train_images']} train / "
          f"{acc['valid_images']} valid shapes at {acc['image_size']}px, mean of seeds {acc['seeds']}): "
          f"naive {acc['naive']['valid_acc']:.3f} in {acc['naive']['train_seconds']:.0f} s a run, "
          f"default {acc['default']['valid_acc']:.3f} in {acc['default']['train_seconds']:.0f} s a run")
    if acc["default"]["valid_acc_int8_trunk"] is not None:
        trunks = sum(r["int8_trunk"] for r in acc["default"]["runs"])
        print(f"  default through its int8 trunk, as trained ({trunks} of {len(acc['seeds'])} runs): "
              f"{acc['default']['valid_acc_int8_trunk']:.3f}")
    if acc["difference_se"] is not None:
        print(f"  default - naive {acc['default_minus_naive']:+.4f}, standard error {acc['difference_se']:.4f} "
              f"(paired by seed: the same draws; run-to-run sd: naive {acc['naive']['sd']:.3f}, "
              f"default {acc['default']['sd']:.3f})")
    if acc["int8_trunk_difference_se"] is not None:
        print(f"  through the int8 trunk - naive {acc['int8_trunk_minus_naive']:+.4f}, "
              f"standard error {acc['int8_trunk_difference_se']:.4f}")


if __name__ == "__main__":
    t0 = time.perf_counter()
    main()
    print(f"({time.perf_counter() - t0:.0f} s)")
