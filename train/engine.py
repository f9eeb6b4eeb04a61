"""One epoch of training and one pass of evaluation; plain PyTorch, no SageMaker.

Per-batch statistics stay on the device and are read once per epoch, so the loop never
waits on the GPU for a log line. Loss is the mean over samples, not the mean of batch means.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import torch
from torch import nn

from imgcls.hardware import fast_bf16
from imgcls.inference import InferenceModel

from .progress import Progress


@dataclass
class Precision:
    dtype: torch.dtype | None      # autocast dtype, None for fp32
    scaler: bool                   # fp16 needs loss scaling
    name: str


def choose_precision(requested: str, device: torch.device) -> Precision:
    """auto: bf16 on GPUs that have it and on CPUs with AMX/AVX512-BF16, fp16+scaler on older GPUs, else fp32."""
    if requested == "fp32":
        return Precision(None, False, "fp32")
    if requested == "bf16" or (requested == "auto" and fast_bf16(device)):
        return Precision(torch.bfloat16, False, "bf16")
    if device.type == "cuda":
        return Precision(torch.float16, True, "fp16")
    if requested == "fp16":
        return Precision(torch.float16, False, "fp16")
    return Precision(None, False, "fp32")


def autocast(device: torch.device, precision: Precision):
    if precision.dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=precision.dtype)


@dataclass
class Batcher:
    """Moves a uint8 batch to the device and normalizes it there; a float batch, which the loader
    normalized already (train.batch_crop, on a CPU), only moves. pin: copy the batch into page-locked
    memory first, in the calling thread, so that its copy to the GPU runs alongside the GPU's work
    (train.data.GPU_PINNING says where a job pins)."""
    device: torch.device
    normalize: callable
    channels_last: bool
    pin: bool = False

    def __call__(self, images: torch.Tensor, labels: torch.Tensor):
        if self.pin:
            images, labels = images.pin_memory(), labels.pin_memory()
        images = images.to(self.device, non_blocking=True)
        labels = labels.to(self.device, non_blocking=True)
        if images.is_floating_point():
            memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
            return images.contiguous(memory_format=memory_format), labels
        return self.normalize(images, channels_last=self.channels_last), labels


@dataclass
class EpochResult:
    loss: float
    accuracy: float
    top_k_accuracy: float
    samples: int
    seconds: float
    data_wait_fraction: float = 0.0
    confusion: torch.Tensor | None = None

    @property
    def images_per_second(self) -> float:
        return self.samples / self.seconds if self.seconds > 0 else 0.0


def _topk_correct(logits: torch.Tensor, labels: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    top = logits.topk(min(k, logits.shape[1]), dim=1).indices
    hits = top == labels[:, None]
    return hits[:, 0].sum(), hits.any(dim=1).sum()


def train_one_epoch(model: nn.Module, loader, batcher: Batcher, criterion, optimizer, scheduler,
                    precision: Precision, scaler, top_k: int, set_mode,
                    progress: Progress | None = None, reduce=None, on_step=None, before_step=None) -> EpochResult:
    """on_step(step, data_wait_s, compute_s, images) after each step (the profiler's step log);
    before_step() before each forward (train.fused_norm.AtSaveSteps)."""
    set_mode()
    device = batcher.device
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    correct = torch.zeros((), device=device, dtype=torch.long)
    correct_k = torch.zeros((), device=device, dtype=torch.long)
    samples, wait = 0, 0.0
    start = time.perf_counter()
    ready = start
    for step, (images, labels) in enumerate(loader):
        got = time.perf_counter()
        wait += got - ready
        x, y = batcher(images, labels)
        if before_step is not None:
            before_step()
        with autocast(device, precision):
            logits = model(x)
            loss = criterion(logits.float(), y)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        scheduler.step()
        n = y.shape[0]
        loss_sum += loss.detach().double() * n
        c1, ck = _topk_correct(logits.detach(), y, top_k)
        correct += c1
        correct_k += ck
        samples += n
        if progress is not None:
            progress.update(n, loss=loss, step=step)
        waited = got - ready
        ready = time.perf_counter()
        if on_step is not None:
            on_step(step, waited, ready - got, n)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    totals = torch.stack([loss_sum, correct.double(), correct_k.double(), torch.tensor(float(samples), device=device,
                                                                                          dtype=torch.float64)])
    if reduce is not None:
        totals = reduce(totals)
    loss_total, c1, ck, n = totals.tolist()
    n = max(n, 1)
    return EpochResult(loss_total / n, c1 / n, ck / n, int(n), seconds, wait / seconds if seconds else 0.0)


# Images a precision's top-1 agreement with fp32 is measured on (bf16 here, int8 in train.int8): a
# 99% gate needs a few hundred to mean anything, and each one costs an fp32 and a served forward.
AGREEMENT_IMAGES = 1024


class ServedTop1:
    """Top-1 classes of a loader's batches with the model run as the endpoint runs it in dtype:
    `computed`'s (a tensor per batch, in the loader's order) where they cover batch i, else
    computed here."""

    def __init__(self, model: nn.Module, dtype: torch.dtype | None, computed: list | None = None):
        self.model, self.dtype, self.computed = model, dtype, computed
        self.served = None

    def __call__(self, i: int, x: torch.Tensor) -> torch.Tensor:
        kept = self.computed[i] if self.computed is not None and i < len(self.computed) else None
        if kept is not None and len(kept) >= x.shape[0]:
            return kept[:x.shape[0]]
        self.served = self.served or InferenceModel(self.model, x[:1], self.dtype)
        return self.served(x).argmax(1)


@torch.inference_mode()
def top1_agreement(model: nn.Module, loader, batcher: Batcher, dtype: torch.dtype, reduce=None,
                   references: list | None = None, limit: int | None = None,
                   computed: tuple[torch.dtype | None, list] | None = None) -> float:
    """Share of images whose top-1 class is the same in dtype as in fp32, each run as the endpoint
    runs the model (imgcls.inference): whether the server may answer in that precision
    (serve.predictor reads it from the artifact). references: a list that gets fp32's top-1
    classes, a tensor per batch, so that int8's comparison over the same loader (train.int8.build)
    need not run fp32 again. limit: at most this many of the loader's images, the first.
    computed: (a precision, its top-1 classes of the loader's batches in its order), from a pass
    that ran the model as served (evaluate's top1): that side of the comparison is not run again
    where it is dtype's or fp32's."""
    model.eval()
    same = total = 0
    known = dict([computed]) if computed is not None else {}
    # fp32 too as a CPU worker runs it, a frozen trace: 17-18 against 21 ms an image eager for
    # resnet18, 49-51 against 61-66 for resnet50 (224 px, 2 AMX cores)
    fp32, served = ServedTop1(model, None, known.get(None)), ServedTop1(model, dtype, known.get(dtype))
    with torch.no_grad():
        for i, (images, labels) in enumerate(loader):
            x, _ = batcher(images, labels)
            x = x if limit is None else x[:limit - total]
            reference = fp32(i, x)
            if references is not None:
                references.append(reference)
            same += int((served(i, x) == reference).sum())
            total += x.shape[0]
            if limit is not None and total >= limit:
                break
    if reduce is not None:
        same, total = (int(v) for v in reduce(torch.tensor([same, total], dtype=torch.long, device=batcher.device)))
    return same / max(total, 1)


@torch.inference_mode()
def evaluate(model: nn.Module, loader, batcher: Batcher, precision: Precision, top_k: int,
             num_classes: int, reduce=None, top1: list | None = None) -> EpochResult:
    """Plain cross-entropy (no label smoothing) so valid loss compares across recipes. top1 (a job's
    report pass): the model runs as the endpoint runs it in this precision (imgcls.inference; on a
    CPU a frozen trace, 22 against 30 ms an image eager for resnet50 in bf16 at 224 px), and the
    list gets each batch's top-1 classes, which top1_agreement need not compute again."""
    model.eval()
    device = batcher.device
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.long, device=device)
    correct_k = torch.zeros((), device=device, dtype=torch.long)
    served = None
    start = time.perf_counter()
    for images, labels in loader:
        x, y = batcher(images, labels)
        if top1 is None:
            with autocast(device, precision):
                logits = model(x).float()
        else:
            served = served or InferenceModel(model, x[:1], precision.dtype)
            logits = served(x)
            top1.append(logits.argmax(1))
        loss_sum += nn.functional.cross_entropy(logits, y, reduction="sum").double()
        _, ck = _topk_correct(logits, y, top_k)
        correct_k += ck
        confusion.view(-1).index_add_(0, y * num_classes + logits.argmax(1), torch.ones_like(y))
    seconds = time.perf_counter() - start
    if reduce is not None:
        loss_sum, correct_k, confusion = reduce(loss_sum), reduce(correct_k), reduce(confusion)
    n = int(confusion.sum())
    return EpochResult(float(loss_sum) / max(n, 1), float(confusion.trace()) / max(n, 1),
                       float(correct_k) / max(n, 1), n, seconds, confusion=confusion.cpu())
