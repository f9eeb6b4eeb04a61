"""The training job: SageMaker contract at the edge (`main`), plain PyTorch inside (`train`)."""

from __future__ import annotations

import logging
import math
import os
import random
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from imgcls import artifact, quantize
from imgcls.errors import ClassifierError
from imgcls.models import create_model
from imgcls.presets import ClassificationPresetEval, ClassificationPresetTrain

from . import (
    batch_crop,
    cache,
    checkpoint,
    contract,
    conv_gemm,
    data,
    device_decode,
    distributed,
    finetune,
    frozen_trunk,
    fused_norm,
    hyperparams,
    int8,
    metrics,
    outputs,
    profiling,
    weights,
)
from .debugger import Debugger, collections, module_collections
from .engine import (
    AGREEMENT_IMAGES,
    Batcher,
    autocast,
    choose_precision,
    evaluate,
    top1_agreement,
    train_one_epoch,
)
from .progress import Progress

log = logging.getLogger("train")


@dataclass
class Splits:
    train: data.Channel
    valid: data.Channel
    test: data.Channel | None

    @property
    def classes(self) -> list[str]:
        return self.train.classes


def load_data(cfg: hyperparams.Config, channels: dict[str, Path], scan_workers: int) -> Splits:
    if "train" not in channels:
        raise contract.ContractError("The job has no 'train' channel: pass inputs={'train': 's3://bucket/prefix'} "
                                     "(a folder of class folders) to fit().")
    train_ch = data.scan_channel("train", channels["train"], scan_workers)
    valid_ch = data.scan_channel("valid", channels["valid"], scan_workers) if "valid" in channels else None
    test_ch = data.scan_channel("test", channels["test"], scan_workers) if "test" in channels else None
    data.check_class_sets(train_ch, [c for c in (valid_ch, test_ch) if c is not None])
    if valid_ch is None:
        train_ch, valid_ch = data.split_train_valid(train_ch, cfg.valid_fraction, cfg.seed)
        log.info("no 'valid' channel: held out %d of %d train images (valid-fraction %g, seed %d) for validation",
                 len(valid_ch.samples), len(train_ch.samples) + len(valid_ch.samples), cfg.valid_fraction, cfg.seed)
    if len(train_ch.samples) < 2:
        raise data.DataError("Training needs at least 2 usable images in the 'train' channel.")
    for channel in (train_ch, valid_ch, test_ch):
        if channel is not None:
            data.log_class_counts(channel)
    return Splits(train_ch, valid_ch, test_ch)


def auto_workers(num_cpus: int, processes_on_host: int, on_gpu: bool, cached: bool = False) -> int:
    per_process = max(1, num_cpus // processes_on_host)
    if on_gpu:
        return min(16, per_process)
    # On a CPU host the model shares the cores with the workers, so leave it half of them. With
    # the images decoded in memory a sample is only cropped and flipped: a worker process then
    # costs the step more than it saves below 4 cores (resnet18 frozen, 2 cores: 0.84-0.90 of the
    # synthetic rate in the training process, 0.73-0.82 with one worker).
    return per_process // 4 if cached else max(1, per_process // 2)


def decode_once(cfg: hyperparams.Config, splits: Splits, eval_preset, threads: int,
                copies: int = 1) -> dict[str, cache.DecodedImages]:
    """Per channel name, its decoded images when they are to be kept in memory (cache-images).
    copies: processes on this host that each keep their own (data-parallel ranks)."""
    evals = [c for c in (splits.valid, splits.test) if c is not None]
    paths = lambda c: [p for p, _ in c.samples]  # noqa: E731
    train_size, why = cache.plan(cfg.cache_images, paths(splits.train), sum(len(c.samples) for c in evals),
                                 eval_preset, copies)
    if train_size is None:
        log.info("decode once: off (%s)", why)
        return {}
    caches = cache.decode_splits(paths(splits.train), {c.name: paths(c) for c in evals}, eval_preset, threads,
                                 train_size)
    log.info("decode once: %s images kept in memory (%.0f MiB, decoded in %.1f s; train images at a shorter side "
             "of at most %d px; %s); later epochs skip decoding",
             " + ".join(f"{len(v)} {k}" for k, v in caches.items()), sum(v.nbytes for v in caches.values()) / 2**20,
             sum(v.seconds for v in caches.values()), train_size, why)
    return caches


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def compiled(model: nn.Module, wanted: bool, debugger: Debugger, quiet: bool = False) -> nn.Module:
    """The module the training loop calls: the model itself, or with compile=true its
    torch.compile wrapper, which shares its parameters (checkpoints and the artifact still save
    the model). Compiling costs seconds per mode (train, eval) before its first step (8-22 s for
    resnet18 on 2 CPUs) and pays only in some setups; `make bench` measures it on the hardware at
    hand."""
    if not wanted:
        return model
    if debugger.active:
        if not quiet:
            log.warning("compile=true is ignored: the debugger hook needs the eager model (its hooks save "
                        "tensors from each layer); remove the debugger hook config to compile")
        return model
    if not quiet:
        log.info("compile=true: torch.compile (inductor); the first training and evaluation steps compile")
    return torch.compile(model)


def example_batch(cfg: hyperparams.Config, device: torch.device) -> torch.Tensor:
    """A training batch's shape, layout and device, for timing and tracing kernels. Its own
    generator: the job's random streams stay as the seed set them."""
    example = torch.randn(cfg.batch_size, 3, cfg.image_size, cfg.image_size, device=device,
                          generator=torch.Generator(device).manual_seed(0))
    return example.contiguous(memory_format=torch.channels_last) if cfg.channels_last else example


def trace_trunk(cfg: hyperparams.Config, model: nn.Module, device: torch.device, precision,
                debugger_config: Path | None, calibration=None) -> tuple[list[str], frozen_trunk.Int8Trunk | None]:
    """frozen-trunk: the frozen leading modules of a ResNet run as one frozen trace
    (train.frozen_trunk); returns their names and the int8 trunk where it runs in int8. Before
    conv-gemm, which then times only the rest.
    calibration: a callable returning normalized training batches (int8.calibration_channel
    through the eval preset), for the int8 trunk; without it the trunk is a float trace."""
    names = frozen_trunk.trunk(model)
    if not names:
        return [], None
    compiling = cfg.compile and debugger_config is None  # compile() ignores compile=true under the hook
    why = frozen_trunk.why_not(cfg.frozen_trunk, device, compiling, collections(debugger_config))
    if why:
        log.info("frozen-trunk: the frozen %s run eagerly (%s)", "/".join(names), why)
        return [], None
    quantized = (int8_trunk(cfg.frozen_trunk, model, names, calibration)
                 if calibration is not None and frozen_trunk.wants_int8(cfg.frozen_trunk) else None)
    frozen_trunk.attach(model, names, example_batch(cfg, device), precision.dtype, quantized and quantized.graph)
    log.info("frozen-trunk: the frozen %s run as one frozen %s trace", "/".join(names),
             "int8" if quantized is not None else precision.name)
    return names, quantized


def int8_trunk(mode: str, model: nn.Module, names: list[str], calibration) -> frozen_trunk.Int8Trunk | None:
    """The trunk in int8, or None where auto keeps the float trace: its features stray too far
    from fp32's, or quantizing failed (the job trains on: the float trace computes the same function)."""
    start = time.perf_counter()
    try:
        quantized, error = frozen_trunk.quantized(model, names, calibration())
    except Exception as exc:
        log.warning("frozen-trunk: quantizing the trunk failed (%s: %s); it runs as a float trace",
                    type(exc).__name__, str(exc).strip()[:300])
        return None
    log.info("frozen-trunk: int8 calibrated on the training images in %.1f s; its features are %.3f from fp32's, "
             "relative to their spread between images", time.perf_counter() - start, error)
    if error <= frozen_trunk.INT8_MAX_ERROR:
        return quantized
    if mode == "int8":
        log.warning("frozen-trunk: that is more than %.2f: int8 kept, as frozen-trunk=int8 asks",
                    frozen_trunk.INT8_MAX_ERROR)
        return quantized
    log.warning("frozen-trunk: that is more than %.2f: the float trace instead (frozen-trunk=int8 would keep int8)",
                frozen_trunk.INT8_MAX_ERROR)
    return None


def gemm_convs(cfg: hyperparams.Config, model: nn.Module, device: torch.device, precision,
               rank: distributed.Rank | None = None) -> list[str]:
    """conv-gemm: time the model's convolutions at this job's batch, image size and precision and
    run those as one matrix multiply that train faster so (train.conv_gemm); returns their names.
    In a data-parallel job rank 0 times them and every rank runs its picks: ranks timing at once
    on shared CPUs would pick differently where the two kernels tie, and compute differently for
    the picks rank 0 logs."""
    mode = cfg.conv_gemm
    if mode != "false" and cfg.compile:
        log.info("conv-gemm=%s: off with compile=true (inductor chooses its own kernels)", mode)
        return []
    rank = rank or distributed.Rank()

    def timed():
        return conv_gemm.choose(model, example_batch(cfg, device), lambda: autocast(device, precision), mode)

    if rank.world_size > 1 and mode == "auto" and device.type == "cpu":
        chosen = rank.broadcast(timed() if rank.is_main else None)
        if not rank.is_main:
            conv_gemm.swap(model, chosen["swapped"])
    else:
        chosen = timed()
    if mode == "true" or chosen["swapped"]:
        log.info("conv-gemm=%s: %d of %d convolutions run as one matrix multiply (%s; timed in %.1f s)", mode,
                 len(chosen["swapped"]), chosen["convs"], ", ".join(chosen["swapped"]) or "none", chosen["seconds"])
    elif device.type == "cpu" and mode == "auto":
        log.info("conv-gemm=auto: oneDNN was faster for every convolution at these shapes (timed in %.1f s)",
                 chosen["seconds"])
    return chosen["swapped"]


def fuse_norms(cfg: hyperparams.Config, model: nn.Module, device: torch.device, precision,
               debugger_config: Path | None) -> int:
    """fused-norm: batch norm with the ReLU and residual add after it as one kernel pass each way
    (train.fused_norm); returns how many batch norms run so. After conv-gemm, whose timing runs the
    plain modules."""
    compiling = cfg.compile and debugger_config is None
    why = fused_norm.why_not(cfg.fused_norm, device, precision.name, cfg.channels_last, compiling)
    if why:
        if device.type == "cpu" or cfg.fused_norm != "auto":
            log.info("fused-norm=%s: ATen's batch norm (%s)", cfg.fused_norm, why)
        return 0
    count = fused_norm.fuse(model)
    log.info("fused-norm=auto: %d batch norms train with the ReLU and residual add after them in one kernel "
             "each way", count)
    return count


def train(cfg: hyperparams.Config, job: contract.Job, rank: distributed.Rank) -> dict:
    """Fine-tune, checkpoint each epoch, write the artifact; returns the final metrics."""
    seed_everything(cfg.seed)
    on_gpu = torch.cuda.is_available()
    device = torch.device(f"cuda:{rank.local_rank}" if on_gpu else "cpu")
    # Every training batch has one shape: cuDNN times its algorithms once per shape and keeps the fastest.
    torch.backends.cudnn.benchmark = on_gpu
    rank.start(device)
    for name in job.ignored_channels:
        log.warning("channel '%s' is not one of train, valid, test, pretrained: ignored", name)

    splits = load_data(cfg, job.channels, scan_workers=max(2, job.num_cpus))
    classes = splits.classes
    top_k = min(cfg.top_k, len(classes))
    if top_k < cfg.top_k:
        log.info("top-k %d is more than the %d classes: reporting top-%d", cfg.top_k, len(classes), top_k)

    init, state_dict, source = weights.resolve(cfg.weights, job.channels.get("pretrained"))
    model = create_model(cfg.arch, len(classes), weights=init, state_dict=state_dict, source=source)
    frozen = finetune.frozen_prefixes(model, cfg.freeze)
    trainable = finetune.apply_freeze(model, frozen)
    model.to(device, memory_format=torch.channels_last if cfg.channels_last else torch.contiguous_format)
    precision = choose_precision(cfg.precision, device)
    log.info("model: %s from %s, %d classes, freeze=%s (%d trainable parameters), %s on %s, channels-last=%s",
             cfg.arch, source, len(classes), cfg.freeze, trainable, precision.name, device, cfg.channels_last)

    train_preset = ClassificationPresetTrain(cfg.image_size, cfg.augment)
    eval_preset = ClassificationPresetEval(cfg.image_size)
    n_train = len(splits.train.samples)
    caches = decode_once(cfg, splits, eval_preset, threads=max(1, job.num_cpus // rank.local_world_size),
                         copies=rank.local_world_size)
    workers = cfg.num_workers if cfg.num_workers >= 0 else \
        auto_workers(job.num_cpus, rank.local_world_size, on_gpu, cached="train" in caches)
    per_rank = len(data.EpochSampler(n_train, cfg.seed, True, rank.rank, rank.world_size))
    drop_last = per_rank % cfg.batch_size == 1  # a batch of one breaks BatchNorm
    loader_pins, batcher_pins = data.pinning(data.GPU_PINNING, on_gpu)
    batcher = Batcher(device, train_preset.normalize, cfg.channels_last, pin=batcher_pins)
    if cfg.gpu_decode and "train" not in caches:
        log.info("gpu-decode: training JPEGs decode a batch at a time on %s (nvJPEG on a GPU)%s", device,
                 "" if on_gpu else "; on a CPU this only moves decoding from the workers to the training process")
        train_loader = device_decode.make_loader(splits.train, cfg.batch_size, shuffle=True, seed=cfg.seed,
                                                 workers=workers, drop_last=drop_last, rank=rank.rank,
                                                 world_size=rank.world_size, run_ahead=True)
        train_batcher = device_decode.DeviceDecoder(device, train_preset, cfg.seed, cfg.channels_last)
    else:
        if cfg.gpu_decode:
            log.info("gpu-decode: off, the training images are already decoded in memory (cache-images)")
        train_loader = data.make_loader(splits.train, train_preset, cfg.batch_size, shuffle=True, seed=cfg.seed,
                                        workers=workers, pin_memory=loader_pins, rank=rank.rank,
                                        world_size=rank.world_size, drop_last=drop_last, cache=caches.get("train"),
                                        run_ahead=True, normalize=None if on_gpu else train_preset)
        train_batcher = batcher
        if "train" in caches:
            why = batch_crop.why_not(train_preset)
            in_workers = "" if why is not None or batch_crop.permutes() or workers == 0 else (
                "; image by image in the loader workers, which run one thread: without AVX-512 VBMI the kernel "
                "beats torch's resize only on several")
            log.info("random crop: %s", "a batch at a time, in one call of train/crop_resize.c (the same pixels as "
                     f"image by image){'' if on_gpu else ', normalized in the same pass'}{in_workers}"
                     if why is None else f"image by image ({why})")
    eval_bs = cfg.eval_batch_size or 2 * cfg.batch_size
    eval_loaders = {c.name: data.make_loader(c, data.identity if c.name in caches else eval_preset, eval_bs,
                                             shuffle=False, seed=cfg.seed, workers=workers, pin_memory=loader_pins,
                                             rank=rank.rank, world_size=rank.world_size, cache=caches.get(c.name))
                    for c in (splits.valid, splits.test) if c is not None}
    per_process = (f" per process x {rank.world_size} processes = global batch {cfg.batch_size * rank.world_size}"
                   if rank.world_size > 1 else "")
    log.info("data: batch size %d%s, %d steps per epoch, %d data-loader workers%s", cfg.batch_size, per_process,
             len(train_loader), workers, " per process" if rank.world_size > 1 else "")

    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    optimizer = finetune.make_optimizer(cfg.optimizer, finetune.param_groups(model, cfg.weight_decay),
                                        cfg.lr, cfg.momentum, cfg.eps)
    steps = len(train_loader)
    scheduler = finetune.warmup_cosine(optimizer, cfg.epochs * steps, round(cfg.warmup_epochs * steps))
    scaler = torch.amp.GradScaler(device.type) if precision.scaler else None

    hps = cfg.as_hyperparameters()
    history: list[dict] = []
    best = {"loss": float("inf"), "epoch": 0, "state": None}
    bad_epochs, start_epoch = 0, 0
    resumed = checkpoint.load(job.checkpoint_dir, hps)
    if resumed is not None:
        if resumed["classes"] != classes:
            raise checkpoint.CheckpointError(f"The checkpoint in {job.checkpoint_dir} was trained on other classes: "
                                             "give each job its own checkpoint_s3_uri.")
        model.load_state_dict(resumed["model"])
        optimizer.load_state_dict(resumed["optimizer"])
        scheduler.load_state_dict(resumed["scheduler"])
        if resumed.get("steps_per_epoch", steps) != steps:
            # Resumed with another world size: the schedule continues from the same epoch, not step.
            scheduler.last_epoch = resumed["epoch"] * steps
            for group, base, factor in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas, strict=True):
                group["lr"] = base * factor(scheduler.last_epoch)
            log.info("resumed with %d steps per epoch (the checkpoint had %d): learning-rate schedule rescaled",
                     steps, resumed["steps_per_epoch"])
        if scaler is not None and resumed.get("scaler"):
            scaler.load_state_dict(resumed["scaler"])
        checkpoint.set_rng_state(resumed["rng"])
        history, best, bad_epochs, start_epoch = (resumed["history"], resumed["best"], resumed["bad_epochs"],
                                                  resumed["epoch"])
        log.info("resumed from %s after epoch %d", job.checkpoint_dir / checkpoint.FILENAME, start_epoch)

    _, trunk_int8 = trace_trunk(cfg, model, device, precision, job.debugger_config,
                                lambda: calibration_batches(splits.train, eval_preset, batcher, cfg.seed, workers))
    gemm_convs(cfg, model, device, precision, rank)
    fused = fuse_norms(cfg, model, device, precision, job.debugger_config)
    debugger = Debugger.create(job.debugger_config, model, criterion, enabled=rank.is_main,
                               base_dir=job.output_dir.parent)
    watched = module_collections(collections(job.debugger_config))
    norms = fused_norm.AtSaveSteps(model) if fused and debugger.active and watched else None
    before_step = None if norms is None else lambda: norms(debugger.saves_module_tensors_next())
    if norms is not None:
        log.info("fused-norm: fused between the debugger's save steps; ATen's modules at the steps where the "
                 "debugger saves %s (each ReLU module must run) and in evaluation", ", ".join(watched))
    profile_settings = profiling.ProfileSettings.resolve(cfg.profile_interval_ms, cfg.profile_steps,
                                                         job.profiler_config)
    # DDP for the training steps only: evaluation shards are uneven and need no gradient sync.
    run_model = compiled(rank.wrap(model, device), cfg.compile, debugger)
    eval_model = compiled(model, cfg.compile, debugger, quiet=True)
    set_mode = lambda: finetune.set_train_mode(model, frozen)  # noqa: E731
    profile_dir = job.output_data_dir / "profile" if rank.is_main else None
    run_info = {"workers": workers, "cpus": job.num_cpus, "batch_size": cfg.batch_size, "world_size": rank.world_size,
                "arch": cfg.arch, "image_size": cfg.image_size, "precision": precision.name}
    if rank.local_rank == 0:  # each host's folder is its own copy of the checkpoint_s3_uri
        checkpoint.remove_partial_writes(job.checkpoint_dir)
    checkpointer = checkpoint.Writer(job.checkpoint_dir)  # writes while the next epoch trains
    with profiling.Profiler(profile_dir, profile_settings, device, run_info) as profiler:
        for epoch in range(start_epoch, cfg.epochs):
            lr = optimizer.param_groups[0]["lr"]
            progress = Progress(len(train_loader.sampler), f"epoch {epoch + 1}/{cfg.epochs}", enabled=rank.is_main)
            debugger.train_mode()
            tr = train_one_epoch(run_model, data.epoch_batches(train_loader, epoch), train_batcher, criterion,
                                 optimizer, scheduler, precision, scaler, top_k, set_mode, progress, reduce=rank.reduce,
                                 on_step=lambda step, wait, compute, n, e=epoch + 1: profiler.step(e, step, wait, compute, n),
                                 before_step=before_step)
            progress.close()
            if norms is not None:
                norms.plain()
            debugger.eval_mode()
            va = evaluate(eval_model, eval_loaders["valid"], batcher, precision, top_k, len(classes), reduce=rank.reduce)
            record = {"epoch": epoch + 1, "train_loss": tr.loss, "train_acc": tr.accuracy,
                      "train_topk_acc": tr.top_k_accuracy, "valid_loss": va.loss, "valid_acc": va.accuracy,
                      "valid_topk_acc": va.top_k_accuracy, "lr": lr, "images_per_sec": tr.images_per_second,
                      "data_wait": tr.data_wait_fraction}
            history.append(record)
            log.info(metrics.epoch_line(record, cfg.epochs))
            debugger.save_scalars({k: v for k, v in record.items() if k != "epoch"})
            if math.isfinite(va.loss) and va.loss < best["loss"]:
                best = {"loss": va.loss, "epoch": epoch + 1,
                        "state": {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}}
                bad_epochs = 0
            else:
                bad_epochs += 1
            stop = cfg.patience > 0 and bad_epochs >= cfg.patience
            if rank.is_main:
                checkpointer.save({
                    "epoch": epoch + 1, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict() if scaler else None,
                    "rng": checkpoint.rng_state(), "best": best, "bad_epochs": bad_epochs, "history": history,
                    "hyperparameters": hps, "classes": classes, "steps_per_epoch": steps,
                    "world_size": rank.world_size})
            if stop:
                log.info("early stopping: valid loss has not improved for %d epochs (best %.4g at epoch %d)",
                         cfg.patience, best["loss"], best["epoch"])
                break
    checkpointer.close()
    debugger.close()
    train_loader.close()  # its workers would go on into an epoch that will not run
    conv_gemm.restore(model)  # what is evaluated, exported and quantized from here is the plain model
    fused_norm.restore(model)
    frozen_trunk.detach(model)

    if best["state"] is not None:
        model.load_state_dict(best["state"])
    else:  # a diverged run still leaves its artifact and outputs, for the debugger rules to explain
        log.warning("valid loss was never finite (the run diverged): keeping the last epoch's weights; "
                    "lower lr or raise warmup-epochs")
        best["epoch"] = history[-1]["epoch"]
    final = {k: v for k, v in history[-1].items()} if history else {}
    final.update({f"best_{k}": v for k, v in next(h for h in history if h["epoch"] == best["epoch"]).items()})
    report_channel = "test" if splits.test is not None else "valid"
    served_top1 = []  # the report pass runs as served in the training precision: one side of the bf16 check
    result = evaluate(model, eval_loaders[report_channel], batcher, precision, top_k, len(classes), reduce=rank.reduce,
                      top1=served_top1)
    if splits.test is not None:
        test = {"test_loss": result.loss, "test_acc": result.accuracy, "test_topk_acc": result.top_k_accuracy}
        log.info(metrics.test_line(test))
        final.update(test)
    fp32_top1 = []  # int8's comparison below runs over the same loader: fp32 once for both
    # AGREEMENT_IMAGES in all: on a CPU a test image costs this check a bf16 or an fp32 forward where
    # the job trained in one of them (the report pass ran it), else both
    final["bf16_top1_agreement"] = top1_agreement(model, eval_loaders[report_channel], batcher, torch.bfloat16,
                                                  reduce=rank.reduce, references=fp32_top1,
                                                  limit=-(-AGREEMENT_IMAGES // rank.world_size),
                                                  computed=(precision.dtype, served_top1))
    log.info("bf16 gives the same top-1 class as fp32 on %.1f%% of the %s images (the first %d at most; the server "
             "answers in bf16 where the hardware is fast at it and this is at least 99%%)",
             100 * final["bf16_top1_agreement"], report_channel, AGREEMENT_IMAGES)
    int8_models = []
    if rank.is_main and cfg.int8:
        int8_models = make_int8(model, final, splits, eval_preset, eval_loaders[report_channel], batcher,
                                cfg.seed, workers, report_channel, fp32_top1, trunk_int8)
    if rank.is_main:
        write_results(job, cfg, model, eval_preset, splits, history, final, result, report_channel, best["epoch"],
                      int8_models)
    return final


def calibration_loader(train: data.Channel, eval_preset, seed: int, workers: int):
    """int8's calibration images (the artifact's model and the int8 trunk alike), through the eval
    preset, in batches of int8.calibration_batch: not the job's, so the int8 models do not depend on it."""
    return data.make_loader(int8.calibration_channel(train), eval_preset,
                            int8.calibration_batch(eval_preset.crop_size), shuffle=False,
                            seed=seed, workers=min(workers, 2), pin_memory=False)


def calibration_batches(train: data.Channel, eval_preset, batcher: Batcher, seed: int, workers: int):
    """calibration_loader's images as normalized batches on the batcher's device (the int8 trunk's input)."""
    for images, labels in calibration_loader(train, eval_preset, seed, workers):
        yield batcher(images, labels)[0]


def make_int8(model, final, splits: Splits, eval_preset, report_loader, batcher, seed, workers,
              channel, references=None, trunk: frozen_trunk.Int8Trunk | None = None):
    """The int8 models (int8.build) and their agreements in `final`, or none where int8 cannot be
    built here: the artifact is still complete without them, and the server answers in fp32. trunk: trace_trunk's
    int8 trunk; where it is every module before the head, the int8 models are its variants with the
    trained head (frozen_trunk.int8_models) instead of calibrating the model again."""
    if not quantize.available():
        log.info("int8: this torch has no %s quantization engine; the artifact has no int8 model", quantize.ENGINE)
        return []
    try:
        made = frozen_trunk.int8_models(model, trunk)
        if made:
            log.info("int8: the int8 trunk the head trained on, with the trained head in fp32 (the trunk was "
                     "calibrated on the same training images before the first epoch; not calibrated again)")
        calibration = None if made else calibration_loader(splits.train, eval_preset, seed, workers)
        built, compared = int8.build(model, calibration, report_loader, batcher, references=references, graphs=made)
    except Exception as exc:  # FX tracing fails on some architectures; fp32 serving still works
        log.warning("int8: quantizing %s failed (%s: %s); the artifact has no int8 model and the server answers "
                    "in fp32 or bf16", type(model).__name__, type(exc).__name__, str(exc).strip()[:300])
        return []
    for graph, agreement in built:
        final[int8.metric(graph)] = agreement
        log.info("int8%s gives the same top-1 class as fp32 on %.1f%% of %d %s images (a CPU server answers in int8 "
                 "where this is at least 99%%)", " with 8-bit activations (CPUs with VNNI)" if quantize.needs_vnni(graph)
                 else "", 100 * agreement, compared, channel)
    return [graph for graph, _ in built]


def write_results(job, cfg, model, eval_preset, splits: Splits, history, final, result, channel, best_epoch,
                  int8_models=()) -> None:
    classes = splits.classes
    card = artifact.ModelCard(arch=cfg.arch, class_names=classes, preprocess=eval_preset.to_dict(),
                              metrics={**final, "best_epoch": best_epoch},
                              hyperparameters=cfg.as_hyperparameters(), versions=artifact.library_versions())
    artifact.save(job.model_dir, model, card)
    for graph in int8_models:
        artifact.save_int8(job.model_dir, graph)
    out = job.output_data_dir
    train_counts = splits.train.class_counts(classes)
    per_class = outputs.write_confusion(out, result.confusion, classes, channel, train_counts)
    outputs.write_json(out / "metrics.json", {"history": history, "final": final, "best_epoch": best_epoch,
                                              "per_class_accuracy": per_class, "confusion_channel": channel})
    outputs.write_json(out / "class_counts.json", {c.name: c.class_counts(classes)
                                                   for c in (splits.train, splits.valid, splits.test) if c})
    skipped = [f"{c.name}\t{p}\t{why}" for c in (splits.train, splits.valid, splits.test) if c for p, why in c.skipped]
    (out / "skipped_files.txt").write_text("".join(line + "\n" for line in skipped))
    outputs.plot_learning_curves(out / "learning_curves.png", history)
    log.info("model written to %s (best epoch %d); metrics, confusion matrix and learning curves in %s",
             job.model_dir, best_epoch, out)


def explain(exc: BaseException) -> tuple[str, bool]:
    """(one plain sentence saying what went wrong and what to do, whether a traceback helps)."""
    text = str(exc)
    if isinstance(exc, ClassifierError):
        return text, False
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return ("The GPU ran out of memory: lower batch-size or image-size, or pick an instance type with "
                "more GPU memory."), False
    if isinstance(exc, MemoryError):
        return "The instance ran out of memory: lower batch-size, num-workers or image-size, or pick a larger instance.", False
    if "DataLoader worker" in text and ("killed" in text or "shared memory" in text or "Bus error" in text):
        return ("A data-loader worker died, usually because shared memory (/dev/shm) is too small: run the "
                "container with --shm-size 2g or more, or lower num-workers."), True
    return (f"Training failed with an unexpected {type(exc).__name__}: {text}. The traceback below shows where; "
            "please report it with the job's log."), True


def write_failure(path: Path, exc: BaseException, who: str = "") -> None:
    """SageMaker shows the failure file's first line as the job's FailureReason. who: which rank
    failed, in a data-parallel job, where the first rank to fail writes it and later ones (whose
    peer went away) do not overwrite it."""
    sentence, with_traceback = explain(exc)
    sentence = f"{who}: {sentence}" if who else sentence
    details = "".join(traceback.format_exception(exc)) if with_traceback else f"{type(exc).__name__}\n"
    log.error("%s", sentence)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "x" if who else "w") as fh:
            fh.write(f"{sentence}\n\n{details}")
    except FileExistsError:
        pass  # another rank failed first; its message is the job's
    except OSError as write_exc:
        log.error("could not write the failure file %s: %s", path, write_exc)


def main(environ=os.environ) -> int:
    rank = distributed.from_environment(environ)
    distributed.setup_logging(rank)
    failure = contract.base_dir(environ) / "output" / "failure"
    try:
        job = contract.read_job(environ)
        failure = job.failure_file
        cfg = hyperparams.parse(job.hyperparameters)
        log.info("hyperparameters: %s", " ".join(f"{k}={v}" for k, v in cfg.as_hyperparameters().items()))
        start = time.perf_counter()
        train(cfg, job, rank)
        log.info("training finished in %.1f s", time.perf_counter() - start)
        return 0
    except (Exception, KeyboardInterrupt) as exc:
        who = f"rank {rank.rank} of {rank.world_size} ({environ.get('SM_CURRENT_HOST', 'this host')})" \
            if rank.world_size > 1 else ""
        write_failure(failure, exc, who)
        return 1
    finally:
        rank.stop()
        sys.stdout.flush()
