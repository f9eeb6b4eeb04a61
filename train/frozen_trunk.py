"""A frozen ResNet trunk as one frozen trace (hyperparameter frozen-trunk).

With freeze=backbone (or a stage), the leading part of the network is a fixed function: its
weights do not train and its BatchNorm runs on running statistics. Eager autocast still casts
its weights on every step and runs each BatchNorm as a pass of its own. Frozen by
`torch.jit.freeze` under the step's autocast, as imgcls.inference serves a model, the trunk keeps
the cast weights as constants and folds BatchNorm into the convolutions. On the 2-core
AVX512-BF16 CPU the frozen-backbone training step (batch 32, 128 px) went from 120 to 106 ms
(resnet18) and from 333 to 282 ms (resnet50), the two taking turns (docs/benchmarks.md).

`attach` gives the model an instance `forward` that runs the trunk's trace and then the rest of
ResNet's forward eagerly; parameters, module names and the state dict stay as they are, so
checkpoints, the debugger's weights and the artifact see the same model. `detach` removes it
before export. The trace holds copies of the frozen weights, so it is built after weights are
loaded (a resumed checkpoint included) and never sees them change.
"""

from __future__ import annotations

import types

import torch
import torchvision
from torch import nn

from imgcls.inference import InferenceModel

# torchvision's ResNet._forward_impl, in order; torch.flatten comes between avgpool and fc.
FORWARD = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4", "avgpool")
# Debugger collections that read the loss, the parameters or their gradients, never a module's
# inputs or outputs: the trace runs the trunk's modules without their hooks.
HOOK_SAFE_COLLECTIONS = frozenset({"losses", "weights", "biases", "gradients"})


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
    if compile:
        return "compile=true compiles the whole model instead"
    watched = sorted((collections or set()) - HOOK_SAFE_COLLECTIONS)
    if watched:
        return (f"the debugger saves the collections {', '.join(watched)}, which need the trunk's own modules "
                "to run; save only losses, weights, biases and gradients to trace it")
    return None


def attach(model: nn.Module, names: list[str], example: torch.Tensor, autocast_dtype: torch.dtype | None) -> None:
    """Trace the trunk `names` (of trunk()) on `example` and route model's forward through it."""
    rest = FORWARD[len(names):]
    module = nn.Sequential(*(model.get_submodule(n) for n in names))
    # eval() on the Sequential alone would set the shared modules too; they are frozen and stay in
    # eval mode in training (finetune.set_train_mode), which is exactly what the trace computes.
    modes = {m: m.training for m in module.modules()}
    module.eval()
    try:  # the server's frozen trace (imgcls.inference), of the trunk alone
        graph = InferenceModel(module, example, autocast_dtype, mode="jit").graph
    finally:
        for m, training in modes.items():
            m.training = training

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            x = graph(x)
        for name in rest:
            x = getattr(self, name)(x)
        return self.fc(torch.flatten(x, 1))

    model.forward = types.MethodType(forward, model)
    model.frozen_trunk = tuple(names)


def detach(model: nn.Module) -> None:
    """The model's own forward again (before evaluation for export, quantizing and saving)."""
    if "forward" in model.__dict__:
        del model.forward
        del model.frozen_trunk
