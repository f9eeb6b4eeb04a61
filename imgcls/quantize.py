"""int8 for CPU servers: post-training static quantization of the trained model.

On every CPU measured, int8 is the cheapest forward. At batch 1, 224 px, one thread:
- AVX2 only (AMD EPYC Zen 3, 2 cores), where bf16 is emulated: ResNet-18 ran 31.8 ms as a frozen
  int8 trace against 77.4 ms for the frozen fp32 trace and 95.4 ms eager; ResNet-50 81.5 against
  179 and 206 ms;
- AVX512-BF16 and VNNI (AMD EPYC Zen 4, 2 cores): ResNet-18 11.8 ms in int8 against 27.3 ms for
  the frozen bf16 trace and 55.0 ms fp32; ResNet-50 27.3 against 70.8 and 132.4 ms;
- AMX (Intel Xeon, 2 cores): ResNet-18 6.2 ms in int8 against 16.9 ms for the frozen bf16 trace
  (channels-last, on AMX tiles) and 51.9 ms fp32; ResNet-50 27.6 against 75.4 and 168.6 ms.

int8 changes answers more than bf16 does, so the trainer measures it: it calibrates on training
images, then counts on the test (else valid) images how often int8 picks fp32's top-1 class. The
server answers in int8 only when that agreement is at least 99% (serve.predictor).

Where torch's `x86` engine runs oneDNN's convolutions anyway (Linux, AVX512-VNNI: Xeons since
Cascade Lake, Zen 4), the model is built for the `onednn` engine, which runs each residual add and
its ReLU inside the convolution before them (`quantized::conv2d_add_relu`): on 2 AMX cores, batch 1,
224 px, one thread, ResNet-50 9.9-10.8 against 12.5 ms, ResNet-18 3.0-3.1 against 3.4-3.5 ms
(docs/benchmarks.md). The activations keep `x86`'s 7-bit range, so the model's numbers match the
`x86` build's and a CPU without VNNI cannot saturate on them. Such a model needs that engine set
when it is loaded and run: the artifact's int8 file records it (imgcls.artifact).

Where it builds for `onednn`, quantize_variants() also makes a second model with 8-bit activations
(`onednn`'s own qconfig) from the same calibration pass: its output is closer to fp32's (make demo's
resnet18: logits' relative error 0.0082-0.0083 against 0.0108-0.0109, top-1 agreement on its 120
test images 98.3-99.2% against 96.7-97.5%), but only where the serving CPU has VNNI: held to
AVX512_CORE or AVX2, oneDNN's kernels gave it 0.0148 (docs/benchmarks.md). The server picks
(serve.predictor).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import sys
import warnings
from collections.abc import Iterable

import torch
from torch import nn

from .hardware import fast_int8_dot

ENGINE = "x86"   # fbgemm's successor in torch; onednn kernels where they are faster
FUSED_ENGINE = "onednn"   # the only engine with a convolution that adds the residual branch
_ENGINE_ATTR = "quantized_engine"
_VNNI_ATTR = "needs_vnni"


def available(engine: str = ENGINE) -> bool:
    return engine in torch.backends.quantized.supported_engines


@functools.cache
def build_engine() -> str:
    """The engine this machine builds int8 models for: FUSED_ENGINE where `x86` would run oneDNN's
    convolutions anyway (torch's rule: Linux and AVX512-VNNI), else ENGINE."""
    if available(FUSED_ENGINE) and sys.platform == "linux" and fast_int8_dot(torch.device("cpu")):
        return FUSED_ENGINE
    return ENGINE


def engine_of(module: nn.Module) -> str:
    """The engine an int8 module of calibrate(), freeze() or imgcls.artifact.load_int8 runs on
    (ENGINE for one made before the engine was recorded)."""
    return getattr(module, _ENGINE_ATTR, ENGINE)


def needs_vnni(module: nn.Module) -> bool:
    """Whether an int8 module has 8-bit activations (quantize_variants): as accurate as measured
    only on a CPU with VNNI (vnni_ready)."""
    return getattr(module, _VNNI_ATTR, False)


def vnni_ready() -> bool:
    """Whether this machine runs a needs_vnni model as accurately as the machine that built it."""
    return build_engine() == FUSED_ENGINE


def mark(module: nn.Module, engine: str, vnni: bool | None = None) -> nn.Module:
    """`module`, recording the engine it runs on (engine_of) and, where given, whether it
    needs VNNI (needs_vnni): the process-wide engine may change."""
    setattr(module, _ENGINE_ATTR, engine)
    if vnni is not None:
        setattr(module, _VNNI_ATTR, vnni)
    return module


def use_engine(engine: str = ENGINE) -> None:
    """Quantized kernels run on the process-wide engine: set it before loading or running a model."""
    torch.backends.quantized.engine = engine


def quantize(model: nn.Module, batches: Iterable[torch.Tensor], head: str | None,
             engine: str | None = None) -> torch.jit.ScriptModule:
    """A frozen int8 TorchScript module of `model` (left unchanged) that takes the same
    normalized float NCHW batch and returns float outputs. `batches` calibrate the activation
    ranges; `head` (the final Linear layer) stays fp32: on a weakly trained ResNet-18 that
    raised agreement with fp32 from 91.9% to 95.5% at the cost of one small matmul. None for a
    model without one (a frozen trunk, train.frozen_trunk). engine: build_engine() by default."""
    modules, example = calibrate(model, batches, head, engine)
    return freeze(modules[0], example)


def quantize_variants(model: nn.Module, batches: Iterable[torch.Tensor], head: str | None) -> list[torch.jit.ScriptModule]:
    """quantize()'s model, and where this machine builds for FUSED_ENGINE a second one with 8-bit
    activations (needs_vnni), from one calibration pass."""
    modules, example = calibrate(model, batches, head, vnni=vnni_ready())
    return [freeze(m, example) for m in modules]


def calibrate(model: nn.Module, batches: Iterable[torch.Tensor], head: str | None,
              engine: str | None = None, vnni: bool = False) -> tuple[list[nn.Module], torch.Tensor]:
    """quantize()'s int8 module before it is traced (an eager FX module), with vnni a second one
    with 8-bit activations (FUSED_ENGINE only), and an input for the trace."""
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.backend_config import get_onednn_backend_config
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    engine = engine or build_engine()
    vnni = vnni and engine == FUSED_ENGINE
    use_engine(engine)
    # FUSED_ENGINE's patterns fuse conv + add (+ ReLU); the first model keeps ENGINE's 7-bit activations.
    fusing = {"backend_config": get_onednn_backend_config()} if engine == FUSED_ENGINE else {}
    fp32 = copy.deepcopy(model).to("cpu", torch.float32, memory_format=torch.contiguous_format).eval()
    qconfigs = [get_default_qconfig_mapping(ENGINE)] + ([get_default_qconfig_mapping(FUSED_ENGINE)] if vnni else [])
    if head is not None:
        qconfigs = [q.set_module_name(head, None) for q in qconfigs]
    with _quiet(), torch.no_grad():
        prepared = example = None
        for x in batches:
            x = x.to("cpu", torch.float32).contiguous()
            if prepared is None:
                example = x[:1]
                prepared = [prepare_fx(copy.deepcopy(fp32), q, (example,), **fusing) for q in qconfigs]
            prepared[-1](x)
        if prepared is None:
            raise ValueError("int8 calibration needs at least one batch of images")
        # An activation observer's histogram does not depend on the range it is reduced to, so the
        # 8-bit model's observers give the 7-bit one the same scales as its own pass (checked equal).
        for p in prepared[:-1]:
            p.load_state_dict(prepared[-1].state_dict())
        return [mark(convert_fx(p, **fusing), engine, vnni=i == 1) for i, p in enumerate(prepared)], example


def freeze(module: nn.Module, example: torch.Tensor) -> torch.jit.ScriptModule:
    """A frozen TorchScript trace of an int8 module of calibrate(), or of one built around it,
    for the same engine."""
    engine = engine_of(module)
    use_engine(engine)
    with _quiet(), torch.no_grad():
        return mark(torch.jit.freeze(torch.jit.trace(module.eval(), example)), engine, needs_vnni(module))


def with_head(trunk: nn.Module, head: nn.Module, example: torch.Tensor) -> torch.jit.ScriptModule:
    """A whole model in int8 whose layers before `head` are `trunk` (calibrate()'s int8 module of
    them) and whose forward flattens their output into `head` (kept fp32), without calibrating
    again: for layers calibrated on the same images that have not changed since (a frozen backbone
    that trained on its int8 trunk, train.frozen_trunk). It differs from quantize() of the whole
    model in one activation scale: there the last layer's output shares its observer with the
    flattened features as well, so the pooled values count twice in that histogram."""
    whole = nn.Sequential(trunk, nn.Flatten(1), copy.deepcopy(head).to("cpu", torch.float32))
    return freeze(mark(whole, engine_of(trunk), needs_vnni(trunk)), example)


@contextlib.contextmanager
def _quiet():
    # FX quantization and torch.jit warn that they are deprecated. Their successors need torchao
    # (not in our pins) or compile in every worker (about 20 s each here); these are what the
    # pinned torch ships, and tests/test_int8.py fails when a torch drops them.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", (DeprecationWarning, FutureWarning, UserWarning, torch.jit.TracerWarning))
        yield


class Int8Model:
    """Calls an int8 module as imgcls.inference.InferenceModel calls the float model: a normalized
    batch on any device, in any layout, in; float32 logits on that device out."""

    mode = "int8 trace"

    def __init__(self, graph: torch.jit.ScriptModule):
        use_engine(engine_of(graph))
        self.graph = graph

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.graph(x.to("cpu", torch.float32).contiguous()).float().to(x.device)
