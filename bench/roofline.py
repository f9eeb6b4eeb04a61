"""How near a training step or a served forward runs to the device's arithmetic rate.

A ResNet's work is its convolutions and its head, matrix multiplies at heart. So two figures,
measured in the same run, say how much room any kernel, layout or data-path change has left:
- the model's FLOPs per image, counted by torch's FlopCounterMode on one eager step (training)
  or forward (serving);
- the rate of a large dense matrix multiply on the device, in each precision a configuration
  runs in, timed in the same rounds as the configurations.

Model FLOP/s over the multiply's rate is a utilization (MFU, against a rate measured here rather
than a data-sheet peak). The multiply's rate over the model's FLOPs is the most images/s that
precision allows: no configuration of the same model and precision can beat it, short of doing
less arithmetic (Winograd convolutions, a smaller model). Against the naive configuration's
images/s it bounds the vs-naive ratio.
"""

from __future__ import annotations

import time

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "int8": torch.int8}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_rate(device: torch.device, precision: str, n: int, repeats: int) -> float:
    """GFLOP/s of an n x n by n x n multiply in `precision` (a key of DTYPES), the best of `repeats`
    after one warm-up: the fastest dense arithmetic this device's libraries give at that precision.
    int8 multiplies int8 by int8 into int32 (torch._int_mm: VNNI or AMX on a CPU), as the quantized
    convolutions of an int8 model do; its operations count as FLOPs."""
    dtype = DTYPES[precision]
    g = torch.Generator().manual_seed(0)
    if dtype == torch.int8:
        a, b = (torch.randint(-128, 128, (n, n), generator=g, dtype=dtype).to(device) for _ in range(2))
        multiply = torch._int_mm
    else:
        a, b = (torch.randn(n, n, generator=g).to(device, dtype) for _ in range(2))
        multiply = torch.matmul
    multiply(a, b)
    _sync(device)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        multiply(a, b)
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


def step_gflop(model: nn.Module, image_size: int, batch: int = 2) -> float:
    """GFLOP per image of one training step of `model` (forward, and backward where parameters
    train; with none trainable, the forward a server runs), counted on random inputs. The model's
    parameters, buffers and gradients are used, so pass a model that nothing else needs.
    FlopCounterMode counts convolutions and matrix multiplies (what the multiply's rate bounds)
    and skips backward work autograd skips."""
    device = next(model.parameters()).device
    x = torch.randn(batch, 3, image_size, image_size, device=device)
    with FlopCounterMode(display=False) as counter:
        logits = model(x)
        if logits.requires_grad:
            logits.sum().backward()
    return counter.get_total_flops() / batch / 1e9


def sizes(device: torch.device, quick: bool) -> tuple[int, int]:
    """(n, repeats) for matmul_rate: large enough to reach the device's rate, small enough to time
    in a second; a GPU needs a larger multiply to hide its launch."""
    if quick:
        return 256, 2
    return (8192, 10) if device.type == "cuda" else (2048, 5)
