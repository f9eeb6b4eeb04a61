"""Batch norm with the ReLU and residual add after it, as one pass each way (hyperparameter fused-norm).

In bf16 channels-last training on a CPU, ATen's batch norm and the ReLU and add around it each
walk the whole activation: in resnet50 at 128 px on 2 AMX cores they took a quarter of the step,
9-12 times a copy of the same bytes (docs/benchmarks.md). `fused_norm.c` computes the statistics
in one pass and normalizes, adds the identity and applies the ReLU in a second; its backward is two
passes as well. The file is compiled on first use on the machine that trains (gcc, -march=native,
against the OpenMP runtime torch already loaded, so both share one thread pool) and cached by its
contents and the CPU's flags. Without a compiler the job trains with ATen's modules, as before.

`fuse` swaps the classes of a ResNet's batch norms, blocks and max pool and fuses the stem's ReLU
(the state dict is the same); `restore` puts them back before export, as conv_gemm does. Where a batch norm is not training in
bf16 channels-last on a CPU (evaluation, fp32, a GPU) the swapped modules compute exactly what the
originals do, with ATen.
"""

from __future__ import annotations

import ctypes
import logging
import types
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

from . import native

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("fused_norm.c")

_P, _I, _D, _INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_double, ctypes.c_int
_SIGNATURES = {  # name: (arguments, result)
    "imgcls_bn_forward": ((_P, _P, _P, _I, _I, _P, _P, _D, _D, _P, _P, _INT, _P, _P, _P, _P), _INT),
    "imgcls_bn_backward": ((_P, _P, _P, _P, _P, _I, _I, _INT, _P, _P, _P, _P, _P, _P, _P), _INT),
    "imgcls_maxpool_forward": ((_P, _P, _P, _I, _I, _I, _I, _I, _I, _INT, _INT, _INT), None),
    "imgcls_maxpool_backward": ((_P, _P, _P, _I, _I, _I, _I, _I, _I, _INT, _INT, _INT), None),
}
MAXPOOL_CHANNELS = 4096  # as in fused_norm.c
KERNELS = native.Kernels(SOURCE, _SIGNATURES)


def library() -> ctypes.CDLL | None:
    """The compiled kernels, built on first use; None where they cannot be (why_not_built() says why)."""
    return KERNELS.library()


def why_not_built() -> str | None:
    return KERNELS.why_not_built()


def _ptr(t: torch.Tensor | None):
    return None if t is None else t.data_ptr()


def _check(status: int) -> None:
    if status != 0:
        raise MemoryError("fused-norm: out of memory for the batch norm's per-channel sums")


class _Norm(torch.autograd.Function):
    """y = relu?(batch_norm(x) + identity?) on bf16 channels-last x; updates the running statistics."""

    @staticmethod
    def forward(ctx, x, identity, weight, bias, running_mean, running_var, eps, momentum, relu):
        n, c, h, w = x.shape
        y = torch.empty_like(x)
        saved = torch.empty(4, c, dtype=torch.float32)  # mean, invstd, scale, bias
        _check(library().imgcls_bn_forward(_ptr(x), _ptr(identity), _ptr(y), n * h * w, c, _ptr(weight), _ptr(bias),
                                           eps, momentum, _ptr(running_mean), _ptr(running_var), int(relu),
                                           *(_ptr(row) for row in saved)))
        # With a residual the ReLU's mask comes from the output (the next block's input, kept anyway);
        # without one it is recomputed from x.
        ctx.save_for_backward(x, y if identity is not None and relu else None, weight, saved)
        ctx.relu, ctx.residual = relu, identity is not None
        return y

    @staticmethod
    def backward(ctx, dy):
        x, y, weight, saved = ctx.saved_tensors
        n, c, h, w = x.shape
        dy = dy.to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
        dx = torch.empty_like(x)
        g_identity = torch.empty_like(x) if y is not None else None
        dweight, dbias = torch.empty(c, dtype=torch.float32), torch.empty(c, dtype=torch.float32)
        _check(library().imgcls_bn_backward(_ptr(dy), _ptr(x), _ptr(y), _ptr(g_identity), _ptr(dx), n * h * w, c,
                                            int(ctx.relu), _ptr(weight), *(_ptr(row) for row in saved),
                                            _ptr(dweight), _ptr(dbias)))
        if ctx.residual and g_identity is None:  # a residual without a ReLU passes dy on unchanged
            g_identity = dy
        return dx, g_identity, dweight, dbias, None, None, None, None, None


def _channels_last_bf16(t: torch.Tensor, shape) -> bool:
    return (t.device.type == "cpu" and t.dtype == torch.bfloat16 and t.shape == shape
            and t.is_contiguous(memory_format=torch.channels_last))


class FusedBatchNorm2d(nn.BatchNorm2d):
    """nn.BatchNorm2d that can add a residual and apply a ReLU after itself, in one kernel where it can."""

    def _fusable(self, x: torch.Tensor, identity: torch.Tensor | None) -> bool:
        return (self.training and self.track_running_stats and self.affine and self.momentum is not None
                and x.dim() == 4 and x.shape[0] * x.shape[2] * x.shape[3] > 1 and _channels_last_bf16(x, x.shape)
                and (identity is None or _channels_last_bf16(identity, x.shape))
                and self.weight.dtype == torch.float32 and self.bias.dtype == torch.float32
                and self.running_mean.dtype == torch.float32 and self.running_var.dtype == torch.float32
                and not torch.jit.is_tracing() and not torch.compiler.is_compiling() and library() is not None)

    def forward(self, x: torch.Tensor, identity: torch.Tensor | None = None, relu: bool = False) -> torch.Tensor:
        if not self._fusable(x, identity):
            y = super().forward(x)
            if identity is not None:
                y = y + identity
            return F.relu(y) if relu else y
        self.num_batches_tracked.add_(1)
        return self.kernel(x, identity, self.weight, self.bias, self.running_mean, self.running_var,
                           self.eps, self.momentum, relu)

    # (x, identity, weight, bias, running_mean, running_var, eps, momentum, relu) -> y, with gradients
    kernel = staticmethod(_Norm.apply)


class _MaxPool(torch.autograd.Function):
    """Max pooling of bf16 channels-last x, each output's place in its window kept in one byte."""

    @staticmethod
    def forward(ctx, x, k: int, s: int, p: int):
        n, c, h, w = x.shape
        oh, ow = (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
        y = torch.empty((n, c, oh, ow), dtype=x.dtype, memory_format=torch.channels_last)
        where = torch.empty((n, oh, ow, c), dtype=torch.uint8)
        library().imgcls_maxpool_forward(_ptr(x), _ptr(y), _ptr(where), n, h, w, c, oh, ow, k, s, p)
        ctx.save_for_backward(where)
        ctx.geometry = (n, c, h, w, oh, ow, k, s, p)
        return y

    @staticmethod
    def backward(ctx, g):
        (where,) = ctx.saved_tensors
        n, c, h, w, oh, ow, k, s, p = ctx.geometry
        g = g.to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
        dx = torch.empty((n, c, h, w), dtype=torch.bfloat16, memory_format=torch.channels_last)
        library().imgcls_maxpool_backward(_ptr(g), _ptr(where), _ptr(dx), n, h, w, c, oh, ow, k, s, p)
        return dx, None, None, None


def _square(value) -> int | None:
    pair = (value, value) if isinstance(value, int) else tuple(value)
    return pair[0] if len(pair) == 2 and pair[0] == pair[1] else None


class FusedMaxPool2d(nn.MaxPool2d):
    """nn.MaxPool2d that, while it computes a gradient, keeps its argmax in a byte, not ATen's int64 index
    (the stem's pool: its input is as large as layer1's whole activations)."""

    def _fusable(self, x: torch.Tensor) -> bool:
        k, s, p = _square(self.kernel_size), _square(self.stride), _square(self.padding)
        return (None not in (k, s, p) and _square(self.dilation) == 1 and not self.ceil_mode
                and not self.return_indices and k * k <= 256 and 2 * p <= k and x.dim() == 4
                and x.shape[1] <= MAXPOOL_CHANNELS and min(x.shape[2], x.shape[3]) + 2 * p >= k
                and torch.is_grad_enabled() and x.requires_grad and _channels_last_bf16(x, x.shape)
                and not torch.jit.is_tracing() and not torch.compiler.is_compiling() and library() is not None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._fusable(x):
            return super().forward(x)
        return _MaxPool.apply(x, _square(self.kernel_size), _square(self.stride), _square(self.padding))


class FusedBasicBlock(BasicBlock):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn1(self.conv1(x), relu=True)
        identity = x if self.downsample is None else self.downsample(x)
        return self.bn2(self.conv2(out), identity=identity, relu=True)


class FusedBottleneck(Bottleneck):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn1(self.conv1(x), relu=True)
        out = self.bn2(self.conv2(out), relu=True)
        identity = x if self.downsample is None else self.downsample(x)
        return self.bn3(self.conv3(out), identity=identity, relu=True)


_SWAPS = {nn.BatchNorm2d: FusedBatchNorm2d, BasicBlock: FusedBasicBlock, Bottleneck: FusedBottleneck,
          nn.MaxPool2d: FusedMaxPool2d}
_BACK = {fused: plain for plain, fused in _SWAPS.items()}


def why_not(mode: str, device: torch.device, precision: str, channels_last: bool, compile: bool) -> str | None:
    """None where the job should fuse, else why not (for its log). A debugger that saves modules'
    tensors does not stop it: its save steps run ATen's modules (AtSaveSteps)."""
    if mode == "false":
        return "fused-norm=false"
    if device.type != "cpu":
        return f"the fused kernels are for CPUs (cuDNN's batch norm on {device.type})"
    if precision != "bf16" or not channels_last:
        return (f"the kernels take bf16 channels-last activations; this job trains in {precision}"
                + ("" if channels_last else " with channels-last=false"))
    if compile:
        return "compile=true compiles the whole model instead"
    if library() is None:
        return why_not_built()
    return None


def _stem_forward(self: ResNet, x: torch.Tensor) -> torch.Tensor:
    """ResNet._forward_impl with the stem's ReLU in its batch norm's kernel."""
    x = self.maxpool(self.bn1(self.conv1(x), relu=True))
    x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
    return self.fc(torch.flatten(self.avgpool(x), 1))


def fuse(model: nn.Module) -> int:
    """Swap the classes (not the modules: parameters, buffers and hooks stay); returns how many batch
    norms now run fused. A block is swapped only where its norms are plain BatchNorm2d."""
    for m in model.modules():
        if type(m) in (BasicBlock, Bottleneck):
            norms = [getattr(m, name, None) for name in ("bn1", "bn2", "bn3")]
            if all(type(bn) in (nn.BatchNorm2d, FusedBatchNorm2d) for bn in norms if bn is not None):
                m.__class__ = _SWAPS[type(m)]
    for m in model.modules():
        if type(m) in (nn.BatchNorm2d, nn.MaxPool2d):
            m.__class__ = _SWAPS[type(m)]
    # The stem's ReLU through the instance, not a subclass: the debugger names tensors after the
    # model's class (ResNet_fc.weight). A frozen trunk's forward, where attached, takes precedence.
    if type(model) is ResNet and type(model.bn1) is FusedBatchNorm2d:
        model._forward_impl = types.MethodType(_stem_forward, model)
    return sum(type(m) is FusedBatchNorm2d for m in model.modules())


def restore(model: nn.Module) -> None:
    model.__dict__.pop("_forward_impl", None)
    for m in model.modules():
        if type(m) in _BACK:
            m.__class__ = _BACK[type(m)]


class AtSaveSteps:
    """A fused model beside a debugger that saves modules' inputs or outputs (relu_input ...) at
    some steps: before each training step, call it with whether that step saves them
    (train.debugger.Debugger.saves_module_tensors_next); such steps run ATen's modules, so the hook
    sees every ReLU, and the others run fused, which computes the same up to bf16 rounding.
    plain() before evaluation, whose save steps need the modules as well."""

    def __init__(self, model: nn.Module):
        self.model, self.fused = model, True

    def __call__(self, saves: bool) -> None:
        self._set(not saves)

    def plain(self) -> None:
        self._set(False)

    def _set(self, fused: bool) -> None:
        if fused != self.fused:
            fuse(self.model) if fused else restore(self.model)
            self.fused = fused
