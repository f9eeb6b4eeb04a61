"""The model as the endpoint runs it: one definition for the server and for the trainer, which
measures with it whether bf16 answers like fp32 (the gate serve's precision=auto reads).

At batch 1 on CPU most of eager bf16's time is overhead: autocast casts every weight on every
call and BatchNorm runs as its own pass. A trace frozen under autocast folds BatchNorm into the
convolutions and keeps the cast weights as constants; measured here, ResNet-18 at 224 px went
from 12.4 to 6.1 ms per image and ResNet-50 from 31 to 16 ms (2 cores with AMX, 2026-11-25). Inductor
(`torch.compile`) is faster still (3.6 ms) but compiles for about 20 s per worker on these
cores, so it is an option, not the default.
"""

from __future__ import annotations

import contextlib
import warnings

import torch

MODES = ("auto", "jit", "inductor", "eager")


def resolve_mode(requested: str, device: torch.device) -> str:
    """auto: the frozen trace on CPU; eager on GPUs, where it has not been measured."""
    if requested not in MODES:
        raise ValueError(f"compile mode {requested!r} is not one of {', '.join(MODES)}")
    if requested == "auto":
        return "jit" if device.type == "cpu" else "eager"
    return requested


def _autocast(device: torch.device, dtype: torch.dtype | None, **kwargs):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype, **kwargs)


class InferenceModel:
    """Calls the model on a normalized batch (already on its device, in its layout) and returns
    float32 logits. The model must be in eval mode; it is not changed."""

    def __init__(self, model: torch.nn.Module, example: torch.Tensor, dtype: torch.dtype | None, mode: str = "auto"):
        self.device = example.device
        self.dtype = dtype
        self.mode = resolve_mode(mode, self.device)
        self.model = model
        self.graph = None
        if self.mode == "jit":
            # torch.jit warns that it is deprecated in favour of torch.compile; see the module
            # docstring for why the trace is still the default here.
            with warnings.catch_warnings(), torch.no_grad(), _autocast(self.device, dtype, cache_enabled=False):
                warnings.simplefilter("ignore", FutureWarning)
                self.graph = torch.jit.freeze(torch.jit.trace(model, example))
        elif self.mode == "inductor":
            self.graph = torch.compile(model, options={"freezing": True})

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            if self.mode == "jit":
                return self.graph(x).float()
            with _autocast(self.device, self.dtype):
                return (self.model if self.graph is None else self.graph)(x).float()
