"""The artifact's int8 model (hyperparameter int8): calibrated on training images through the
eval preset, measured against fp32 on the report images, written next to model.pt.

Runs after the last epoch, on the main rank only, the int8 model on the host's CPU: at most 256
calibration images forwarded in fp32 and 1,024 compared images (CALIBRATION_IMAGES,
AGREEMENT_IMAGES). Calibration batches have a size of their own (calibration_batch), so the int8
models do not depend on the job's batch size or number of processes. That took 2.4 s for the tests'
tiny model. resnet50 at 224 px on 2 AMX cores (2026-12-06, random weights): 55 s to calibrate on
256 images, convert and trace, then per 128 compared images 2.1 s in int8; fp32's classes come from
the bf16 check's pass over the same images (build's references), which saved 25 s of 46 for 256
images. A frozen backbone that trained on its int8 trunk is not calibrated again: its int8 models
are that trunk's variants with the trained head (train.frozen_trunk.int8_models), and only the
comparison runs here (1.3 s against 37.6-41.9 s for resnet50 at 224 px, 0.4 against 9.5-10.6 s for
resnet18, 2026-12-06). Where the CPU has VNNI a second model with 8-bit activations comes from the
same calibration pass (imgcls.quantize) and is compared in the same loop: 0.2-1.2 s more to convert
and trace, and 0.13-0.17 s more per 32 compared images, for resnet50 at 224 px on 2 AMX cores
(2026-12-07). int8=false skips it."""

from __future__ import annotations

import logging
import time

import torch
from torch import nn

from imgcls import artifact, quantize
from imgcls.models import head_name

from . import data
from .engine import AGREEMENT_IMAGES, Batcher, ServedTop1

log = logging.getLogger("train")

CALIBRATION_IMAGES = 256   # activation ranges settle well before this on ResNets
CALIBRATION_BATCH = 128    # images per calibration forward at 224 px: a job's default evaluation batch


def calibration_channel(train: data.Channel, limit: int = CALIBRATION_IMAGES) -> data.Channel:
    """Every k-th training image: the samples are ordered by class, so this draws from all."""
    step = max(1, len(train.samples) // limit)
    return data.Channel(train.name, train.root, train.classes, train.samples[::step][:limit])


def calibration_batch(crop_size: int) -> int:
    """Images per calibration forward, whatever the job's batch size and number of processes: a
    histogram observer merges batches approximately, so the same images split otherwise give other
    activation scales, and a job with 2 processes of 4 would get another int8 model than 1 process
    of 8. CALIBRATION_BATCH at 224 px and below, fewer for larger images by their pixels
    (memory)."""
    return max(1, min(CALIBRATION_BATCH, CALIBRATION_BATCH * 224 * 224 // (crop_size * crop_size)))


def metric(graph: torch.jit.ScriptModule) -> str:
    """The metric (model.json) holding an int8 model's top-1 agreement with fp32: serve.predictor
    reads the one of the file it would serve."""
    return f"{artifact.int8_name(quantize.needs_vnni(graph))}_top1_agreement"


@torch.inference_mode()
def build(model: nn.Module, calibration, eval_loader, batcher: Batcher, limit: int = AGREEMENT_IMAGES,
          references: list[torch.Tensor] | None = None,
          graphs: list[torch.jit.ScriptModule] | None = None) -> tuple[list[tuple[torch.jit.ScriptModule, float]], int]:
    """([(int8 module, its top-1 agreement with fp32)], images compared): quantize_variants' models
    (where this CPU has VNNI, a second with 8-bit activations), fp32 run as the endpoint runs it
    (imgcls.inference), as in the bf16 check. references: fp32's top-1 classes of
    eval_loader's batches, in its order (train.engine.top1_agreement keeps them): the comparison
    then runs int8 alone (eager fp32 took 5.5x int8's time channels-last, 7.6x NCHW; resnet50,
    224 px, 2 AMX cores). graphs: int8 modules made already (a frozen backbone's int8 trunks with
    its head, train.frozen_trunk.int8_models): only compared; `calibration` may be None."""
    model.eval()
    start = time.perf_counter()
    calibrated = not graphs
    graphs = graphs or quantize.quantize_variants(
        model, (batcher(images, labels)[0] for images, labels in calibration), head_name(model))
    served = [quantize.Int8Model(g) for g in graphs]
    # references cover what the bf16 check compared: on several ranks, this rank's share
    fp32 = ServedTop1(model, None, references)
    same, total = [0] * len(graphs), 0
    for i, (images, labels) in enumerate(eval_loader):
        x, _ = batcher(images, labels)
        x = x[:limit - total]
        top1 = fp32(i, x)
        for k, run in enumerate(served):
            same[k] += int((run(x).argmax(1) == top1).sum())
        total += x.shape[0]
        if total >= limit:
            break
    log.info("int8: %s in %.1f s%s, for torch's %s quantized engine", "calibrated and compared" if calibrated else "compared",
             time.perf_counter() - start, " (two models: 7-bit and 8-bit activations)" if len(graphs) > 1 else "",
             quantize.engine_of(graphs[0]))
    return [(g, n / max(total, 1)) for g, n in zip(graphs, same, strict=True)], total
