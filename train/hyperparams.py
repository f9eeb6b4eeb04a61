"""Hyperparameters: kebab-case names, string values in, a typed and validated Config out.

SageMaker hands every hyperparameter over as a string and tuners send what users type, so
each value is parsed here with a message that names the hyperparameter, the value, and what
would be accepted. Underscores are accepted for dashes. Names SageMaker adds itself
(`sagemaker_*`, `_tuning_objective_metric`) are not ours and are ignored.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import asdict, dataclass, fields

from imgcls.errors import ClassifierError
from imgcls.presets import AUGMENT_LEVELS

from .profiling import parse_steps

FREEZE_POLICIES = ("none", "backbone", "stem", "layer1", "layer2", "layer3", "layer4")
OPTIMIZERS = ("sgd", "adam", "adamw", "rmsprop")
WEIGHTS = ("auto", "imagenet", "pretrained", "none")
PRECISIONS = ("auto", "bf16", "fp16", "fp32")


class HyperparameterError(ClassifierError):
    """A hyperparameter is unknown or has a value the trainer cannot use."""


@dataclass(frozen=True)
class Config:
    arch: str = "resnet50"
    weights: str = "auto"            # auto: the 'pretrained' channel if given, else imagenet
    freeze: str = "none"
    optimizer: str = "sgd"
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    eps: float = 1e-8
    label_smoothing: float = 0.0
    epochs: int = 10
    warmup_epochs: float = 0.5
    batch_size: int = 64
    eval_batch_size: int = 0         # 0: twice batch-size
    image_size: int = 224
    augment: str = "light"
    patience: int = 5                # epochs without valid-loss improvement; 0 disables early stopping
    seed: int = 42
    top_k: int = 5
    valid_fraction: float = 0.2      # held out of train when there is no valid channel
    num_workers: int = -1            # -1 or "auto": from the CPU count
    precision: str = "auto"
    channels_last: bool = True
    cache_images: str = "auto"       # decode each image once and keep it in memory as uint8 (train.cache)
    compile: bool = False            # torch.compile the training model (inductor); see train.job.compiled
    conv_gemm: str = "auto"          # convolutions as one matrix multiply where timed faster on a CPU (train.conv_gemm)
    fused_norm: str = "auto"         # batch norm + ReLU + residual add as one CPU kernel each way (train.fused_norm)
    frozen_trunk: str = "auto"       # a frozen ResNet trunk as one frozen trace (int8 on a CPU; train.frozen_trunk)
    gpu_decode: bool = False         # decode training JPEGs a batch at a time on the device (train.device_decode)
    int8: bool = True                # also write an int8 model for CPU servers (train.int8)
    processes_per_host: int = 0      # 0 or "auto": one per GPU, one on a CPU host (train.launcher)
    profile_interval_ms: int = 500   # system monitor interval; 0 turns it off
    profile_steps: str = ""          # "START:COUNT": a torch.profiler trace of those training steps

    def as_hyperparameters(self) -> dict:
        return {name.replace("_", "-"): value for name, value in asdict(self).items()}


def _choice(options):
    def parse(raw: str):
        value = raw.strip().lower()
        if value not in options:
            raise ValueError(f"one of {', '.join(options)}")
        return value
    return parse


def _freeze(raw: str) -> str:
    value = raw.strip().lower()
    if value.isdigit() and 1 <= int(value) <= 4:  # 'freeze=2' means up to layer2
        value = f"layer{value}"
    if value in ("false", "0"):
        value = "none"
    if value == "true":
        value = "backbone"
    return _choice(FREEZE_POLICIES)(value)


def _number(kind, low=None, high=None, low_open=False, high_open=False):
    def parse(raw: str):
        text = raw.strip()
        try:
            value = kind(float(text)) if kind is int and float(text).is_integer() else kind(text)
        except ValueError:
            raise ValueError("an integer" if kind is int else "a number") from None
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError("a finite number")
        lo_ok = low is None or (value > low if low_open else value >= low)
        hi_ok = high is None or (value < high if high_open else value <= high)
        if not (lo_ok and hi_ok):
            lo = "" if low is None else f"{'>' if low_open else '>='} {low}"
            hi = "" if high is None else f"{'<' if high_open else '<='} {high}"
            raise ValueError(f"a number {' and '.join(x for x in (lo, hi) if x)}")
        return value
    return parse


def _bool(raw: str) -> bool:
    value = raw.strip().lower()
    if value in ("true", "1", "yes", "on"):
        return True
    if value in ("false", "0", "no", "off"):
        return False
    raise ValueError("true or false")


def _arch(raw: str) -> str:
    from imgcls.models import available_architectures

    value = raw.strip().lower()
    if value not in available_architectures():
        close = difflib.get_close_matches(value, available_architectures(), n=3)
        raise ValueError("a torchvision classification model such as resnet18, resnet50"
                         + (f" (did you mean {', '.join(close)}?)" if close else ""))
    return value


def _workers(raw: str) -> int:
    return -1 if raw.strip().lower() in ("auto", "-1") else _number(int, 0)(raw)


def _processes(raw: str) -> int:
    return 0 if raw.strip().lower() in ("auto", "0") else _number(int, 1, 1024)(raw)


def _steps(raw: str) -> str:
    try:
        start, count = parse_steps(raw)
    except ValueError:
        raise ValueError("START:COUNT with START >= 1 and COUNT >= 1 (e.g. 5:3), or none") from None
    return f"{start}:{count}" if count else ""


PARSERS = {
    "arch": _arch, "weights": _choice(WEIGHTS), "freeze": _freeze, "optimizer": _choice(OPTIMIZERS),
    "lr": _number(float, 0, 10, low_open=True), "momentum": _number(float, 0, 1, high_open=True),
    "weight_decay": _number(float, 0, 1), "eps": _number(float, 0, 1, low_open=True),
    "label_smoothing": _number(float, 0, 1, high_open=True), "epochs": _number(int, 1, 10_000),
    "warmup_epochs": _number(float, 0, 1000), "batch_size": _number(int, 1, 65_536),
    "eval_batch_size": _number(int, 0, 65_536), "image_size": _number(int, 16, 2048),
    "augment": _choice(AUGMENT_LEVELS), "patience": _number(int, 0), "seed": _number(int, 0, 2**31 - 1),
    "top_k": _number(int, 1), "valid_fraction": _number(float, 0, 1, low_open=True, high_open=True),
    "num_workers": _workers, "precision": _choice(PRECISIONS), "channels_last": _bool,
    "cache_images": _choice(("auto", "true", "false")), "compile": _bool, "gpu_decode": _bool,
    "conv_gemm": _choice(("auto", "true", "false")),
    "fused_norm": _choice(("auto", "false")),
    "frozen_trunk": _choice(("auto", "true", "false", "int8")),
    "int8": _bool,
    "processes_per_host": _processes,
    "profile_interval_ms": _number(int, 0, 3_600_000), "profile_steps": _steps,
}
assert set(PARSERS) == {f.name for f in fields(Config)}


# Names users bring from other scripts, pointed at ours.
_ALIASES = {"learning_rate": "lr", "num_epochs": "epochs", "batch": "batch_size", "model": "arch",
            "model_name": "arch", "img_size": "image_size", "early_stopping_patience": "patience"}


def _is_platform_name(name: str) -> bool:
    return name.startswith("sagemaker_") or name.startswith("_")


def parse(raw: dict[str, str]) -> Config:
    """Strings in, Config out; every problem is reported at once, each with what would be accepted."""
    values, problems = {}, []
    for name, text in raw.items():
        if _is_platform_name(name):
            continue
        key = name.replace("-", "_")
        if key not in PARSERS:
            close = [_ALIASES[key]] if key in _ALIASES else difflib.get_close_matches(key, PARSERS, n=1)
            hint = f" (did you mean '{close[0].replace('_', '-')}'?)" if close else ""
            problems.append(f"unknown hyperparameter '{name}'{hint}")
            continue
        try:
            values[key] = PARSERS[key](str(text))
        except ValueError as exc:
            problems.append(f"hyperparameter '{name}' = {text!r} is not valid: expected {exc}")
    if problems:
        known = ", ".join(sorted(k.replace("_", "-") for k in PARSERS))
        listing = f" (known names: {known})" if any(p.startswith("unknown") for p in problems) else ""
        raise HyperparameterError(
            f"Bad hyperparameters: {'; '.join(problems)}. Fix them in the Estimator's hyperparameters{listing}."
        )
    return Config(**values)
