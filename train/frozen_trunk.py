"""A frozen ResNet trunk as one frozen trace (hyperparameter frozen-trunk).

With freeze=backbone (or a stage), the leading part of the network is a fixed function: its
weights do not train and its BatchNorm runs on running statistics. Eager autocast still casts
its weights on every step and runs each BatchNorm as a pass of its own. Frozen by
`torch.jit.freeze` under the step's autocast, as imgcls.inference serves a model, the trunk keeps
the cast weights as constants and folds BatchNorm into the convolutions. On the 2-core
AVX512-BF16 CPU the frozen-backbone training step (batch 32, 128 px) went from 120 to 106 ms
(resnet18) and from 333 to 282 ms (resnet50), the two taking turns (docs/benchmarks.md).

On a CPU with a quantized engine `auto` (and `int8`) freezes the trunk in int8 instead, as the
artifact's int8 model (train.int8) is made: calibrated on the same training images through the
eval preset. Its forward ran 2.3x (resnet18) and 2.0x (resnet50) faster than the bf16 trace at
batch 32, 128 px, on the AVX512-BF16 CPU. Where the int8 features stray from fp32's by more than
INT8_MAX_ERROR (relative to how much they vary between images), `auto` keeps the float trace.
Where the CPU has VNNI the one calibration gives the trunk with 7-bit and with 8-bit activations
(imgcls.quantize), and the head trains on the 8-bit one: with its head it agreed with fp32 on 97.8%
of the frozen probe's images against 95.9% for the 7-bit one (20 seeds, docs/benchmarks.md), and
each becomes one of the artifact's int8 files (int8_models).

`attach` gives the model an instance `forward` that runs the trunk's trace and then the rest of
ResNet's forward eagerly; parameters, module names and the state dict stay as they are, so
checkpoints, the debugger's weights and the artifact see the same model. `detach` removes it
before export. The trace holds copies of the frozen weights, so it is built after weights are
loaded (a resumed checkpoint included) and never sees them change.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterable
from typing import NamedTuple

import torch
import torchvision
from torch import nn

from imgcls import quantize
from imgcls.inference import InferenceModel

from .debugger import module_collections

# torchvision's ResNet._forward_impl, in order; torch.flatten comes between avgpool and fc.
FORWARD = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4", "avgpool")
# int8 features' distance from fp32's over their spread between images (int8_error). Backbones the
# bench trained measured 0.050 and 0.105, and their heads learned as well in int8 as on the float
# trace; random-init ones 0.17-0.23, where a head lost about a point (docs/benchmarks.md).
INT8_MAX_ERROR = 0.15


def trunk(model: nn.Module) -> list[str]:
    """The leading modules of a torchvision ResNet's forward that hold no trainable parameter (as
    freeze leaves them), or [] for other models and where no leading parameter is frozen."""
    if not isinstance(model, torchvision.models.ResNet):
        return []
    names = []
    for name in FORWARD:
        if any(p.requires_grad for p in model.get_submodule(name).parameters()):
            break
        names.append(name)
    return names if any(list(model.get_submodule(n).parameters()) for n in names) else []


def why_not(mode: str, device: torch.device, compile: bool, collections: set[str] | None) -> str | None:
    """None where the trunk should be traced, else why not (for the job's log). collections: the
    debugger's collection names, None without a debugger."""
    if mode == "false":
        return "frozen-trunk=false"
    if mode == "auto" and device.type != "cpu":
        return f"frozen-trunk=auto traces only on a CPU, where it was measured (not on {device.type})"
    if mode == "int8" and device.type != "cpu":
        return f"frozen-trunk=int8 runs quantized CPU kernels, not on {device.type}; use true for a float trace there"
    if compile:
        return "compile=true compiles the whole model instead"
    watched = module_collections(collections)
    if watched:
        return (f"the debugger saves the collections {', '.join(watched)}, which need the trunk's own modules "
                "to run; save only losses, weights, biases and gradients to trace it")
    return None


def wants_int8(mode: str) -> bool:
    """auto and int8 on a CPU whose torch has the quantized engine (why_not has ruled out others)."""
    return mode in ("auto", "int8") and quantize.available()


@contextlib.contextmanager
def _evaluated(module: nn.Module):
    """eval() on a Sequential of the model's own modules sets them too: they are frozen and stay in
    eval mode in training (finetune.set_train_mode), which is what the traces compute; the model's
    modes come back afterwards all the same."""
    modes = {m: m.training for m in module.modules()}
    module.eval()
    try:
        yield module
    finally:
        for m, training in modes.items():
            m.training = training


def _sequential(model: nn.Module, names: list[str]) -> nn.Sequential:
    return nn.Sequential(*(model.get_submodule(n) for n in names))


def int8_error(reference: torch.Tensor, int8: torch.Tensor) -> float:
    """|int8 - fp32| over |fp32 - the batch's mean feature|: how far the int8 features move
    relative to how far images' features lie apart, which is what a head learns from."""
    reference, int8 = reference.flatten(1).float(), int8.flatten(1).float()
    spread = (reference - reference.mean(0)).norm()
    return float((int8 - reference).norm() / spread) if spread > 0 else float("inf")


class Int8Trunk(NamedTuple):
    """The trunk `names` in int8: `graph` runs in the training step; `modules` and `example` (of
    quantize.calibrate: 7-bit activations, and where this CPU has VNNI a second with 8-bit ones,
    which `graph` is) make the artifact's int8 models with the trained head (int8_models)."""
    names: tuple[str, ...]
    graph: torch.jit.ScriptModule
    modules: tuple[nn.Module, ...]
    example: torch.Tensor


def quantized(model: nn.Module, names: list[str], batches: Iterable[torch.Tensor]) -> tuple[Int8Trunk, float]:
    """The trunk `names` in int8, calibrated on `batches` (normalized float images), and its
    int8_error against fp32 on the first of them."""
    first = []

    def keep_first():
        for x in batches:
            if not first:
                first.append(x.to("cpu", torch.float32))
            yield x

    with _evaluated(_sequential(model, names)) as module:
        modules, example = quantize.calibrate(module, keep_first(), None, vnni=quantize.vnni_ready())
        with torch.no_grad():
            x = first[0].to(next(module.parameters()).device)
            reference = module(x).cpu()
    # The head trains on the features nearest fp32's that this CPU computes: 8-bit activations where
    # it has VNNI (the model this machine built them for), else the one model there is.
    graph = quantize.freeze(modules[-1], example)
    with torch.no_grad():
        return (Int8Trunk(tuple(names), graph, tuple(modules), example),
                int8_error(reference, graph(first[0].contiguous())))


def int8_models(model: nn.Module, trunk: Int8Trunk | None) -> list[torch.jit.ScriptModule]:
    """The artifact's int8 models made from the int8 trunk the head trained on, where that trunk is
    every module before fc (freeze=backbone): those weights never changed, and the trunk was
    calibrated on the images train.int8 would calibrate on again (38-42 s for resnet50 at 224 px on
    2 AMX cores). One per trunk variant (quantize.calibrate: where this CPU has VNNI, 8-bit
    activations too). [] otherwise: train.int8 calibrates the whole model."""
    if trunk is None or trunk.names != FORWARD:
        return []
    return [quantize.with_head(module, model.fc, trunk.example) for module in trunk.modules]


def attach(model: nn.Module, names: list[str], example: torch.Tensor, autocast_dtype: torch.dtype | None,
           int8_graph: torch.jit.ScriptModule | None = None) -> None:
    """Route model's forward through the trunk `names` (of trunk()): `int8_graph` (an Int8Trunk's graph)
    where given, else a frozen trace made here on `example` in `autocast_dtype`."""
    rest = FORWARD[len(names):]
    if int8_graph is not None:
        quantize.use_engine(quantize.engine_of(int8_graph))

        def trunk_forward(x: torch.Tensor) -> torch.Tensor:
            # quantized kernels take fp32 NCHW on the CPU and return fp32; autocast has no say in them
            with torch.autocast(x.device.type, enabled=False):
                return int8_graph(x.to("cpu", torch.float32).contiguous()).to(x.device)
    else:
        with _evaluated(_sequential(model, names)) as module:  # the server's frozen trace (imgcls.inference)
            trunk_forward = InferenceModel(module, example, autocast_dtype, mode="jit").graph

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            x = trunk_forward(x)
        for name in rest:
            x = getattr(self, name)(x)
        return self.fc(torch.flatten(x, 1))

    model.forward = types.MethodType(forward, model)
    model.frozen_trunk = tuple(names)
    model.frozen_trunk_int8 = int8_graph is not None


def detach(model: nn.Module) -> None:
    """The model's own forward again (before evaluation for export, quantizing and saving)."""
    if "forward" in model.__dict__:
        del model.forward
        del model.frozen_trunk
        del model.frozen_trunk_int8
