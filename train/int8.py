"""The artifact's int8 model (hyperparameter int8): calibrated on training images through the
eval preset, measured against fp32 on the report images, written next to model.pt.

Runs after the last epoch, on the main rank only, the int8 model on the host's CPU: at most 256
calibration forwards in fp32 and 1,024 compared images (CALIBRATION_IMAGES, AGREEMENT_IMAGES). That
took 2.4 s for the tests' tiny model. resnet50 at 224 px on 2 AMX cores (2026-12-06, random
weights): 55 s to calibrate on 256 images, convert and trace, then per 128 compared images 2.1 s in
int8; fp32's classes come from the bf16 check's pass over the same images (build's references),
which saved 25 s of 46 for 256 images. A frozen backbone that trained on its int8 trunk is not
calibrated again: its int8 model is that trunk with the trained head
(train.frozen_trunk.int8_model), and only the comparison runs here (1.3 s against 37.6-41.9 s for
resnet50 at 224 px, 0.4 against 9.5-10.6 s for resnet18, 2026-12-06). int8=false skips it."""

from __future__ import annotations

import logging
import time

import torch
from torch import nn

from imgcls import quantize
from imgcls.models import head_name

from . import data
from .engine import AGREEMENT_IMAGES, Batcher, ServedTop1

log = logging.getLogger("train")

CALIBRATION_IMAGES = 256   # activation ranges settle well before this on ResNets


def calibration_channel(train: data.Channel, limit: int = CALIBRATION_IMAGES) -> data.Channel:
    """Every k-th training image: the samples are ordered by class, so this draws from all."""
    step = max(1, len(train.samples) // limit)
    return data.Channel(train.name, train.root, train.classes, train.samples[::step][:limit])


@torch.inference_mode()
def build(model: nn.Module, calibration, eval_loader, batcher: Batcher, limit: int = AGREEMENT_IMAGES,
          references: list[torch.Tensor] | None = None,
          graph: torch.jit.ScriptModule | None = None) -> tuple[torch.jit.ScriptModule, float, int]:
    """(int8 module, its top-1 agreement with fp32, images compared), fp32 run as the endpoint
    runs it (imgcls.inference), as in the bf16 check. references: fp32's top-1 classes of
    eval_loader's batches, in its order (train.engine.top1_agreement keeps them): the comparison
    then runs int8 alone (eager fp32 took 5.5x int8's time channels-last, 7.6x NCHW; resnet50,
    224 px, 2 AMX cores). graph: an int8 module made already (a frozen backbone's int8 trunk with
    its head, train.frozen_trunk.int8_model): only compared; `calibration` may be None."""
    model.eval()
    start = time.perf_counter()
    calibrated = graph is None
    if calibrated:
        graph = quantize.quantize(model, (batcher(images, labels)[0] for images, labels in calibration),
                                  head_name(model))
    served = quantize.Int8Model(graph)
    # references cover what the bf16 check compared: on several ranks, this rank's share
    fp32 = ServedTop1(model, None, references)
    same = total = 0
    for i, (images, labels) in enumerate(eval_loader):
        x, _ = batcher(images, labels)
        x = x[:limit - total]
        same += int((served(x).argmax(1) == fp32(i, x)).sum())
        total += x.shape[0]
        if total >= limit:
            break
    log.info("int8: %s in %.1f s, for torch's %s quantized engine", "calibrated and compared" if calibrated else "compared",
             time.perf_counter() - start, quantize.engine_of(graph))
    return graph, same / max(total, 1), total
