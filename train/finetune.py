"""The fine-tuning recipe: what to freeze, which parameters decay, optimizer and schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

from imgcls.models import head_name

from . import memory_order

# ResNet stages in forward order; freezing "up to" a stage freezes it and everything before it.
RESNET_STAGES = [("stem", ("conv1", "bn1")), ("layer1", ("layer1",)), ("layer2", ("layer2",)),
                 ("layer3", ("layer3",)), ("layer4", ("layer4",))]


class FreezeError(ValueError):
    """The freeze setting names no part of this architecture."""


def frozen_prefixes(model: nn.Module, policy: str) -> list[str]:
    """Module name prefixes to freeze under `policy` (none, backbone, stem, layer1..layer4)."""
    if policy == "none":
        return []
    head = head_name(model)
    if policy == "backbone":
        return [name for name, _ in model.named_children() if not _contains(name, head)] + \
            _head_siblings(model, head)
    if not all(hasattr(model, m) for _, mods in RESNET_STAGES for m in mods):
        raise FreezeError(f"freeze={policy} names a ResNet stage, but {type(model).__name__} has no such stages: "
                          "use freeze=backbone or freeze=none.")
    prefixes = []
    for stage, modules in RESNET_STAGES:
        prefixes += list(modules)
        if stage == policy:
            return prefixes
    raise FreezeError(f"unknown freeze policy {policy!r}")


def _contains(prefix: str, name: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _head_siblings(model: nn.Module, head: str) -> list[str]:
    """For heads inside a container (e.g. classifier.1), freeze the container's other members."""
    parts = head.split(".")
    prefixes = []
    for depth in range(1, len(parts)):
        parent = model.get_submodule(".".join(parts[:depth]))
        for name, _ in parent.named_children():
            full = ".".join(parts[:depth] + [name])
            if not _contains(full, head):
                prefixes.append(full)
    return prefixes


def apply_freeze(model: nn.Module, prefixes: list[str]) -> int:
    """Stop gradients for frozen parameters; returns how many parameters stay trainable."""
    for name, param in model.named_parameters():
        if any(_contains(p, name) for p in prefixes):
            param.requires_grad_(False)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def set_train_mode(model: nn.Module, prefixes: list[str]) -> None:
    """Train mode, but frozen parts stay in eval mode: a frozen backbone keeps its BatchNorm statistics."""
    model.train()
    for name in prefixes:
        model.get_submodule(name).eval()


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on weights only: norm layers' parameters and biases are not decayed."""
    norm_types = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm)
    no_decay_ids = set()
    for module in model.modules():
        for pname, param in module.named_parameters(recurse=False):
            if isinstance(module, norm_types) or pname.endswith("bias") or param.ndim <= 1:
                no_decay_ids.add(id(param))
    trainable = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in trainable if id(p) not in no_decay_ids]
    no_decay = [p for p in trainable if id(p) in no_decay_ids]
    return [g for g in ({"params": decay, "weight_decay": weight_decay},
                        {"params": no_decay, "weight_decay": 0.0}) if g["params"]]


def fusable(groups: list[dict]) -> bool:
    """Whether the fused kernels can step these parameters: floating point, all on one CPU or CUDA device."""
    params = [p for g in groups for p in g["params"]]
    return bool(params) and all(p.is_floating_point() for p in params) and \
        len({p.device for p in params}) == 1 and params[0].device.type in ("cpu", "cuda")


def make_optimizer(name: str, groups: list[dict], lr: float, momentum: float, eps: float,
                   views: bool = True) -> torch.optim.Optimizer:
    """SGD, Adam and AdamW step with their fused kernels where they can: one pass over each
    parameter instead of a kernel per operation. resnet18's AdamW step took 25 against 61 ms on the
    2-core AMX CPU (docs/benchmarks.md), the same update to rounding. On a CPU, channels-last
    weights step as 1-D views of themselves (train.memory_order), since the kernels copy each such
    gradient otherwise; views=False leaves that out, to measure it."""
    fused = fusable(groups)
    if name == "sgd":
        cls, args = torch.optim.SGD, {"momentum": momentum, "nesterov": momentum > 0}
    elif name in ("adam", "adamw"):
        cls, args = (torch.optim.Adam if name == "adam" else torch.optim.AdamW), {"eps": eps}
    elif name == "rmsprop":
        return torch.optim.RMSprop(groups, lr=lr, momentum=momentum, eps=eps, alpha=0.9)
    else:
        raise ValueError(f"unknown optimizer {name!r}")
    if not fused:
        return cls(groups, lr=lr, **args)
    if views and any(memory_order.stepped_flat(p) for g in groups for p in g["params"]):
        cls = memory_order.optimizer_class(cls)
    return cls(groups, lr=lr, fused=True, **args)


def warmup_cosine(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int,
                  min_factor: float = 0.01) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up from 1% to the full rate, then cosine decay to `min_factor`; stepped per batch."""
    warmup_steps = min(warmup_steps, max(0, total_steps - 1))

    def factor(step: int) -> float:
        if step < warmup_steps:
            return 0.01 + 0.99 * step / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return min_factor + (1 - min_factor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
