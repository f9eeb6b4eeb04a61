"""Convolutions as one matrix multiply (train.conv_gemm): the same values and gradients as
nn.Conv2d, chosen without touching the model's state, and put back before export."""

import copy

import pytest
import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

from imgcls.models import create_model
from train import conv_gemm
from train.conv_gemm import GemmConv2d
from train.hyperparams import HyperparameterError, parse

FP32 = lambda: torch.autocast("cpu", enabled=False)  # noqa: E731
BF16 = lambda: torch.autocast("cpu", torch.bfloat16)  # noqa: E731


@pytest.mark.parametrize("kernel,stride,padding,bias", [(3, 1, 1, False), (3, 2, 1, True), (1, 1, 0, False),
                                                         (1, 2, 0, True), (7, 2, 3, False), (3, 1, 0, True),
                                                         ((1, 3), (2, 1), (0, 1), False), (3, 3, 2, False),
                                                         ((2, 3), (3, 1), (2, 1), True)])
@pytest.mark.parametrize("channels_last", [True, False])
def test_the_multiply_gives_the_convolution_and_its_gradients(kernel, stride, padding, bias, channels_last):
    torch.manual_seed(0)
    conv = nn.Conv2d(5, 6, kernel, stride, padding, bias=bias).double()
    gemm = copy.deepcopy(conv)
    gemm.__class__ = GemmConv2d
    x = torch.randn(3, 5, 9, 11, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    want, got = conv(xa), gemm(xb)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want)
    g = torch.randn_like(want)
    want.backward(g)
    got.backward(g)
    torch.testing.assert_close(xb.grad, xa.grad)
    torch.testing.assert_close(gemm.weight.grad, conv.weight.grad)
    if bias:
        torch.testing.assert_close(gemm.bias.grad, conv.bias.grad)


def _ops_of(run) -> list[str]:
    """The names of the operators `run()` calls, in order (the profiler's events)."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run()
    return [e.name for e in prof.events()]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_columns_backward_adds_each_position_in_place_without_copying_it(dtype):
    """col2im adds each kernel position's gradient into one input-sized buffer, which the centre
    position starts (a stride-1 "same" kernel: it covers every pixel), so nothing is zero-filled;
    the padding's gradient is never computed. The copies left: the centre into the buffer, and in
    bf16 the other positions converted to the fp32 buffer one at a time and the result back. A
    setitem `+=` also copied every position's view onto itself (about 0.5 ms a resnet18 step)."""
    x = torch.randn(2, 8, 6, 6, dtype=dtype).contiguous(memory_format=torch.channels_last).requires_grad_()
    cols = conv_gemm._Columns.apply(x.permute(0, 2, 3, 1), (3, 3), (1, 1), (1, 1), (6, 6))
    g = torch.randn_like(cols)
    names = _ops_of(lambda: cols.backward(g))
    assert names.count("aten::add_") == 8
    assert names.count("aten::copy_") == 1 + (9 if dtype != torch.float32 else 0), names
    assert not {"aten::fill_", "aten::zero_", "aten::zeros", "aten::new_zeros"} & set(names), names
    # col2im by torch's own fold: (N, C * kh * kw, L) with the channel major
    want = torch.nn.functional.fold(g.double().reshape(2, 36, 9, 8).permute(0, 3, 2, 1).reshape(2, 72, 36),
                                    (6, 6), 3, padding=1)
    torch.testing.assert_close(x.grad, want.to(dtype))


def test_a_1x1_stride_1_columns_backward_passes_the_gradient_through():
    """Without padding or stride a 1x1 kernel's columns are its input, and their gradient is the
    input's: no zero-filled buffer, no add, no copy (resnet50: 42 against 12 ms of col2im a step).
    A 1x1 kernel at stride 2 still scatters into zeros."""
    x = torch.randn(2, 8, 6, 6, dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last).requires_grad_()
    cols = conv_gemm._Columns.apply(x.permute(0, 2, 3, 1), (1, 1), (1, 1), (0, 0), (6, 6))
    g = torch.randn_like(cols)
    names = _ops_of(lambda: cols.backward(g))
    assert not {"aten::fill_", "aten::zero_", "aten::add_", "aten::copy_"} & set(names), names
    torch.testing.assert_close(x.grad, g.permute(0, 3, 1, 2), rtol=0, atol=0)
    assert x.grad.is_contiguous(memory_format=torch.channels_last)
    x.grad = None
    cols = conv_gemm._Columns.apply(x.permute(0, 2, 3, 1), (1, 1), (2, 2), (0, 0), (3, 3))
    g = torch.randn_like(cols)
    cols.backward(g)
    want = torch.zeros_like(x)
    want[:, :, ::2, ::2] = g.permute(0, 3, 1, 2)
    torch.testing.assert_close(x.grad, want, rtol=0, atol=0)


def _bf16_input_grad_error(forward, conv, x, x64_grad, g):
    xi = x.clone().bfloat16().requires_grad_()
    with BF16():
        out = forward(conv, xi)
    out.backward(g.to(out.dtype))
    return ((xi.grad.double() - x64_grad).norm() / x64_grad.norm()).item()


def test_bf16_input_gradients_are_summed_over_kernel_positions_as_widely_as_onednn_sums_them():
    """In bf16 a 3x3 multiply's input gradient adds nine positions per pixel: added in bf16 they
    rounded nine times and ended 1.6x as far from fp64 as oneDNN's convolution (which adds in fp32,
    rounds once); added in fp32, 1.15x (each position's product is still rounded to bf16 first)."""
    torch.manual_seed(0)
    conv = nn.Conv2d(64, 64, 3, 1, 1, bias=False).to(memory_format=torch.channels_last)
    x = torch.randn(16, 64, 8, 8).contiguous(memory_format=torch.channels_last)
    ref = copy.deepcopy(conv).double()
    x64 = x.double().requires_grad_()
    out64 = ref(x64)
    g = torch.randn_like(out64)
    out64.backward(g)
    onednn = _bf16_input_grad_error(nn.Conv2d.forward, conv, x, x64.grad, g)
    gemm = _bf16_input_grad_error(GemmConv2d.forward, conv, x, x64.grad, g)
    assert gemm <= 1.3 * onednn, (gemm, onednn)


def _model():
    torch.manual_seed(1)
    model = create_model("resnet18", 3)
    model.layer1.add_module("grouped", nn.Conv2d(64, 64, 3, padding=1, groups=2))  # not eligible, never run
    return model.to(memory_format=torch.channels_last)


def _example():
    return torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(2)).contiguous(
        memory_format=torch.channels_last)


def test_true_swaps_every_eligible_convolution_and_restore_puts_them_back():
    model = _model().eval()
    x = _example()
    with torch.no_grad():
        before = model(x)
    keys = list(model.state_dict())
    chosen = conv_gemm.choose(model, x, FP32, "true")
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and n != "layer1.grouped"]
    assert sorted(chosen["swapped"]) == sorted(convs) and chosen["convs"] == len(convs) == 20
    assert type(model.layer1.grouped) is nn.Conv2d
    assert all(type(dict(model.named_modules())[n]) is GemmConv2d for n in convs)
    assert list(model.state_dict()) == keys
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, rtol=1e-4, atol=1e-4)
    conv_gemm.restore(model)
    assert not any(type(m) is GemmConv2d for m in model.modules())


def test_auto_times_without_changing_the_model():
    model = _model()
    model.train()
    model.layer2.eval()  # a frozen part's mode must survive the timing
    state = copy.deepcopy(model.state_dict())
    chosen = conv_gemm.choose(model, _example(), BF16, "auto", reps=1)
    assert set(chosen["swapped"]) <= {n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    assert "layer1.grouped" not in chosen["swapped"]
    assert chosen["seconds"] > 0
    for k, v in model.state_dict().items():  # batch norm learned nothing from the example
        assert torch.equal(v, state[k]), k
    assert all(p.grad is None for p in model.parameters())
    assert model.training and not model.layer2.training and model.layer3.training


def test_false_and_columns_too_large_for_memory_swap_nothing(monkeypatch):
    model = _model()
    assert conv_gemm.choose(model, _example(), FP32, "false")["swapped"] == []
    monkeypatch.setattr(conv_gemm, "MAX_COLUMNS_BYTES", 0)
    assert conv_gemm.choose(model, _example(), FP32, "true")["swapped"] == []
    assert not any(type(m) is GemmConv2d for m in model.modules())


def test_conv_gemm_hyperparameter():
    assert parse({}).conv_gemm == "auto"
    assert parse({"conv-gemm": "False"}).conv_gemm == "false"
    with pytest.raises(HyperparameterError, match="'conv-gemm' = 'fast' is not valid: expected one of auto, true, false"):
        parse({"conv-gemm": "fast"})


def test_a_checkpoint_resumes_across_conv_gemm_settings(tmp_path):
    """Only kernels change: a checkpoint of another setting, or of a trainer without it, resumes."""
    from train import checkpoint
    from train.hyperparams import Config

    hps = parse({"conv-gemm": "false"}).as_hyperparameters()
    old = {k: v for k, v in Config().as_hyperparameters().items() if k != "conv-gemm"}
    for before in (hps, old):
        checkpoint.save(tmp_path, {"epoch": 1, "hyperparameters": before})
        assert checkpoint.load(tmp_path, Config().as_hyperparameters())["epoch"] == 1
    checkpoint.save(tmp_path, {"epoch": 1, "hyperparameters": {**old, "lr": 0.5}})
    with pytest.raises(checkpoint.CheckpointError, match="lr"):
        checkpoint.load(tmp_path, Config().as_hyperparameters())
