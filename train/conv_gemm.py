"""Convolutions as one matrix multiply, where that trains faster on a CPU (hyperparameter conv-gemm).

oneDNN's CPU convolutions are slow where the feature maps are small and the channels many: in
resnet18 at 128 px, layer4's 3x3 convolutions (512 channels, 4x4 maps) compute their weight
gradient at about 110 GFLOP/s in bf16 on 2 AMX cores, while one bf16 matrix multiply of the same
size runs at about 1.8 TFLOP/s. `GemmConv2d` computes the same convolution as that multiply:
the kh x kw shifted views of the padded channels-last input side by side (im2col), times the
weights. Autograd derives the gradients of the multiply; only the columns' own backward (col2im)
is written here. The columns cost kh*kw times the input's memory, which is small exactly where
this pays.

`choose` times each convolution both ways at the training step's own shapes, dtype and
gradients (as cudnn.benchmark does on a GPU) and swaps the class only where the multiply is
faster; `restore` puts every one back before export, so the artifact, the traced and the int8
models never see this class. The state dict is the same either way.
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

MIN_SPEEDUP = 1.0          # ties go to the multiply: a tie alone is within the timing's noise either way
MAX_COLUMNS_BYTES = 64 << 20  # larger maps: the columns cost memory, and oneDNN is fast there anyway


def _positions(kernel, stride, out_size):
    """The slice of the padded input that each kernel position (i, j) multiplies."""
    (kh, kw), (sh, sw), (ho, wo) = kernel, stride, out_size
    return [(slice(i, i + sh * (ho - 1) + 1, sh), slice(j, j + sw * (wo - 1) + 1, sw))
            for i in range(kh) for j in range(kw)]


def _on_input(start: int, step: int, count: int, pad: int, size: int):
    """Which of a kernel position's `count` rows (start, start + step, ... in padded coordinates)
    fall on the input's own `size` rows rather than its padding: (rows in the input, rows in the
    position's gradient), or None."""
    first = max(0, -((start - pad) // step))
    last = min(count - 1, (pad + size - 1 - start) // step)
    if first > last:
        return None
    at = start + step * first - pad
    return slice(at, at + step * (last - first) + 1, step), slice(first, last + 1)


class _Columns(torch.autograd.Function):
    """im2col on channels-last memory: (N, H, W, C) to (N, Ho, Wo, kh*kw*C). Autograd's own backward
    of the kh*kw slices builds a zero-filled padded input for each and adds them up (about 7% of a
    resnet18 step); this one adds every position's gradient into one buffer."""

    @staticmethod
    def forward(ctx, xh, kernel, stride, padding, out_size):
        (ph, pw) = padding
        padded = F.pad(xh, (0, 0, pw, pw, ph, ph)) if ph or pw else xh
        spots = _positions(kernel, stride, out_size)
        # The part of each position that lands on the input itself: the padding's gradient is dropped.
        (sh, sw), (ho, wo), (_, h, w, _) = stride, out_size, xh.shape
        parts = []
        for k, (r, c) in enumerate(spots):
            rows, cols = _on_input(r.start, sh, ho, ph, h), _on_input(c.start, sw, wo, pw, w)
            if rows and cols:
                parts.append((k, (rows[0], cols[0]), (rows[1], cols[1])))
        # A position that covers every input pixel once (the centre of a stride-1 "same" kernel)
        # starts the sum: no zero-filled buffer to add it to.
        whole_input = (slice(0, h, 1), slice(0, w, 1))
        first = next((i for i, (_, on, _) in enumerate(parts) if on == whole_input), None)
        if first is not None:
            parts.insert(0, parts.pop(first))
        ctx.geometry = (xh.shape, parts, first is not None)
        # a 1x1 kernel at stride 1 without padding: the columns are the input itself
        ctx.whole = len(spots) == 1 and padded.shape == xh.shape and tuple(stride) == (1, 1)
        if len(spots) == 1:
            return padded[:, spots[0][0], spots[0][1], :].contiguous()
        return torch.cat([padded[:, r, c, :] for r, c in spots], dim=-1)

    @staticmethod
    def backward(ctx, grad):
        shape, parts, starts_whole = ctx.geometry
        if ctx.whole:  # the gradient as it is: through a zero-filled buffer and one add, resnet50's
            # col2im took 42 ms of a full fine-tuning step instead of 12 (profiled; 17 such convs swapped)
            return grad.reshape(shape), None, None, None, None
        channels = shape[-1]
        # Overlapping positions add up in fp32 and round once, as oneDNN's convolution backward does:
        # added in bf16, each sum rounds again (input gradients 1.2-1.6x as far from fp64's, AMX).
        wide = len(parts) > 1 and grad.dtype in (torch.bfloat16, torch.float16)
        dtype = torch.float32 if wide else grad.dtype
        part = lambda k, rows, cols: grad[:, rows, cols, k * channels:(k + 1) * channels]  # noqa: E731
        if starts_whole:
            (k, _, (rows, cols)), parts = parts[0], parts[1:]
            buffer = part(k, rows, cols).to(dtype, memory_format=torch.contiguous_format, copy=True)
        else:
            buffer = grad.new_zeros(shape, dtype=dtype)
        for k, (rows, cols), (grad_rows, grad_cols) in parts:
            # add_ on the view: `buffer[...] += g` would also copy the view onto itself (setitem)
            buffer[:, rows, cols, :].add_(part(k, grad_rows, grad_cols))
        return buffer.to(grad.dtype) if wide else buffer, None, None, None, None


class GemmConv2d(nn.Conv2d):
    """nn.Conv2d (groups 1, no dilation, zero padding) as im2col times the weights."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        (kh, kw), (sh, sw), (ph, pw) = self.kernel_size, self.stride, self.padding
        n, _, h, w = x.shape
        ho, wo = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
        # permute: a view on channels-last memory, as (N, H, W, C)
        cols = _Columns.apply(x.permute(0, 2, 3, 1), self.kernel_size, self.stride, self.padding, (ho, wo))
        # (O, kh, kw, C) matches the columns' order: block i*kw + j holds kernel position (i, j).
        weight = self.weight.permute(0, 2, 3, 1).reshape(self.out_channels, -1)
        out = cols.reshape(n * ho * wo, -1) @ weight.t()
        if self.bias is not None:
            out = out + self.bias
        return out.view(n, ho, wo, self.out_channels).permute(0, 3, 1, 2)


def eligible(conv: nn.Module) -> bool:
    return (type(conv) is nn.Conv2d and conv.groups == 1 and conv.dilation == (1, 1)
            and conv.padding_mode == "zeros" and not isinstance(conv.padding, str))


def columns_bytes(conv: nn.Conv2d, x: torch.Tensor) -> int:
    (kh, kw), (sh, sw), (ph, pw) = conv.kernel_size, conv.stride, conv.padding
    ho, wo = (x.shape[2] + 2 * ph - kh) // sh + 1, (x.shape[3] + 2 * pw - kw) // sw + 1
    return x.shape[0] * ho * wo * kh * kw * conv.in_channels * x.element_size()


def _inputs(model: nn.Module, example: torch.Tensor, autocast) -> dict[str, tuple[torch.Tensor, bool]]:
    """Each eligible convolution's input in one training forward of `example` (shape, dtype,
    layout), and whether the step needs its gradient (anything before it trains)."""
    seen: dict[str, tuple[torch.Tensor, bool]] = {}

    def keep(name, args):
        seen.setdefault(name, (args[0].detach(), args[0].requires_grad))

    hooks = [m.register_forward_pre_hook(lambda m, args, name=name: keep(name, args))
             for name, m in model.named_modules() if eligible(m)]
    modes = {m: m.training for m in model.modules()}
    model.eval()  # batch norm must not learn running statistics from the example
    try:
        with torch.enable_grad(), autocast():
            model(example)
    finally:
        for h in hooks:
            h.remove()
        for m, training in modes.items():
            m.training = training
    return seen


def _time(conv: nn.Conv2d, x: torch.Tensor, grad_input: bool, autocast, reps: int) -> tuple[float, float]:
    """Median seconds of one conv's forward (and backward, where the step computes gradients)
    through oneDNN and as the multiply, the two taking turns so that both see the same host."""
    backward = grad_input or conv.weight.requires_grad
    x = x.clone().requires_grad_(grad_input)
    times: dict = {nn.Conv2d.forward: [], GemmConv2d.forward: []}
    for _ in range(reps + 1):
        for forward, seen in times.items():
            start = time.perf_counter()
            with autocast():
                out = forward(conv, x)
            if backward:
                out.backward(torch.ones_like(out))
            seen.append(time.perf_counter() - start)
    onednn, gemm = (statistics.median(t[1:]) for t in times.values())
    return onednn, gemm


def choose(model: nn.Module, example: torch.Tensor, autocast, mode: str, reps: int = 3) -> dict:
    """Swap the convolutions that train faster as a matrix multiply: with mode 'auto' those timed
    faster, on a CPU only (cuDNN has its own choice); with 'true' every eligible one. Returns
    {"swapped": names, "convs": how many could be, "seconds": the time it took}."""
    start = time.perf_counter()
    names = []
    if mode == "true" or (mode == "auto" and example.device.type == "cpu"):
        modules = dict(model.named_modules())
        inputs = _inputs(model, example, autocast)
        grads = {p: p.grad for p in model.parameters()}
        faster: dict[tuple, bool] = {}
        for name, (x, grad_input) in inputs.items():
            conv = modules[name]
            if columns_bytes(conv, x) > MAX_COLUMNS_BYTES:
                continue
            if mode == "true":
                names.append(name)
                continue
            # Blocks repeat: resnet50 has 53 convolutions of 23 kinds (224 px), each kind timed once.
            kind = (conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                    conv.bias is not None, conv.weight.requires_grad, tuple(x.shape), x.dtype, grad_input)
            if kind not in faster:
                with torch.enable_grad():
                    onednn, gemm = _time(conv, x, grad_input, autocast, reps)
                faster[kind] = onednn >= MIN_SPEEDUP * gemm
            if faster[kind]:
                names.append(name)
        for p, g in grads.items():  # timing must not leave gradients behind
            p.grad = g
        swap(model, names)
    return {"swapped": names, "convs": sum(eligible(m) or type(m) is GemmConv2d for m in model.modules()),
            "seconds": time.perf_counter() - start}


def swap(model: nn.Module, names: list[str]) -> None:
    """Run the named convolutions as the multiply: choose()'s picks, or another process's."""
    modules = dict(model.named_modules())
    for name in names:
        modules[name].__class__ = GemmConv2d


def restore(model: nn.Module) -> None:
    for m in model.modules():
        if type(m) is GemmConv2d:
            m.__class__ = nn.Conv2d
