"""One factory for every model: trainer, server, benchmarks and tests build through it.

Pretrained weights never come from the network here: jobs with network isolation cannot
download, so ImageNet weights are read from torchvision's local cache (the training image
bakes them in) and anything else comes from a file the caller names.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torchvision
from torch import nn

from .errors import WeightsError


def available_architectures() -> list[str]:
    return sorted(torchvision.models.list_models(module=torchvision.models))


def head_name(model: nn.Module) -> str:
    """Name of the final Linear layer, the head that a new class count replaces."""
    last = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            last = name
    if last is None:
        raise WeightsError(f"{type(model).__name__} has no Linear classifier head; pick a ResNet or another "
                           "torchvision model with a Linear head.")
    return last


def _set_submodule(model: nn.Module, dotted: str, new: nn.Module) -> None:
    parent_name, _, child = dotted.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def imagenet_weights_path(arch: str) -> Path:
    """Where torchvision keeps `arch`'s default ImageNet weights (TORCH_HOME or ~/.cache/torch)."""
    weights = torchvision.models.get_model_weights(arch).DEFAULT
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights.url)


def load_imagenet_state_dict(arch: str) -> dict:
    path = imagenet_weights_path(arch)
    if not path.is_file():
        raise WeightsError(
            f"ImageNet weights for {arch} are not on this machine (looked for {path}). "
            f"Build the training image with --build-arg PRETRAINED_ARCHS=\"{arch}\", or on a machine with "
            f"internet run `python -c \"import torchvision; torchvision.models.get_model('{arch}', "
            f"weights='DEFAULT')\"` and copy the file into $TORCH_HOME/hub/checkpoints, or pass the file "
            "through the 'pretrained' channel, or set weights=none to train from scratch."
        )
    return torch.load(path, map_location="cpu", weights_only=True)


def extract_state_dict(obj) -> dict:
    """Model weights out of a state dict or of a checkpoint (ours, Lightning's, DDP-wrapped)."""
    if isinstance(obj, nn.Module):
        obj = obj.state_dict()
    if isinstance(obj, dict):
        for key in ("model", "state_dict", "model_state_dict", "model_state"):
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError("The pretrained file holds neither a state dict nor a checkpoint with one "
                           "(keys 'model', 'state_dict' or 'model_state_dict'): save it with "
                           "torch.save(model.state_dict(), 'weights.pt').")
    for prefix in ("module.", "model."):
        if obj and all(k.startswith(prefix) for k in obj):
            obj = {k[len(prefix):]: v for k, v in obj.items()}
    return obj


def load_weights(model: nn.Module, state_dict: dict, source: str) -> list[str]:
    """Load `state_dict` into `model`, all but a head of another class count.

    Returns the head keys left at their fresh initialisation. Any other mismatch is an error:
    weights of another architecture must not load half-way and train silently.
    """
    head = head_name(model)
    own = model.state_dict()
    skipped = [k for k, v in state_dict.items()
               if k.startswith(head + ".") and k in own and own[k].shape != v.shape]
    usable = {k: v for k, v in state_dict.items() if k not in skipped}
    bad_shapes = [k for k, v in usable.items() if k in own and own[k].shape != v.shape]
    # load_state_dict raises on a shape mismatch even with strict=False, with every key in one message
    result = model.load_state_dict({k: v for k, v in usable.items() if k not in bad_shapes}, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith(head + ".") and k not in bad_shapes]
    if missing or result.unexpected_keys or bad_shapes:
        shapes = [f"{k} {tuple(usable[k].shape)} in the file, {tuple(own[k].shape)} here" for k in bad_shapes]
        detail = (shapes or missing or result.unexpected_keys)[:3]
        raise WeightsError(
            f"The weights from {source} do not fit this {type(model).__name__} "
            f"({len(missing)} missing, {len(result.unexpected_keys)} unexpected, {len(bad_shapes)} of "
            f"another shape, e.g. {detail}): check that the 'arch' hyperparameter names the "
            "architecture the weights were trained with."
        )
    return [k for k in own if k.startswith(head + ".") and (k in skipped or k in result.missing_keys)]


def create_model(arch: str, num_classes: int, weights: str | None = None,
                 state_dict: dict | None = None, source: str = "the given state dict") -> nn.Module:
    """Build `arch` with a new head for `num_classes`.

    weights: None (random init), "imagenet" (local torchvision cache), or "state_dict" to load
    the given `state_dict` (a pretrained file, or an artifact's own weights), which an error names
    as `source`.
    """
    if arch not in available_architectures():
        raise WeightsError(f"Unknown architecture {arch!r}: use one of torchvision's classification "
                           f"models, e.g. resnet18, resnet34, resnet50, resnet101, resnet152.")
    model = torchvision.models.get_model(arch, weights=None)
    if weights == "imagenet":
        load_weights(model, load_imagenet_state_dict(arch), f"torchvision's ImageNet {arch} weights")
    head = head_name(model)
    old = model.get_submodule(head)
    if old.out_features != num_classes:
        _set_submodule(model, head, nn.Linear(old.in_features, num_classes))
    if weights == "state_dict":
        if state_dict is None:
            raise ValueError("weights='state_dict' needs state_dict")
        load_weights(model, state_dict, source)
    elif weights not in (None, "imagenet"):
        raise ValueError(f"weights must be None, 'imagenet' or 'state_dict', got {weights!r}")
    return model
