"""Batch norm with its ReLU and residual add in one kernel (train.fused_norm): at least as close to
fp64 as ATen's bf16 modules, the same running statistics, ATen's own result wherever the kernel does
not apply, the same state dict, and the plain classes back before export."""

import copy
import os
import tempfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

from imgcls.models import create_model
from train import fused_norm, native
from train.fused_norm import FusedBatchNorm2d
from train.hyperparams import HyperparameterError, parse

needs_kernel = pytest.mark.skipif(fused_norm.library() is None, reason=f"no kernel: {fused_norm.why_not_built()}")
CL = torch.channels_last


def _norm(channels: int, fused: bool, seed: int = 0) -> nn.BatchNorm2d:
    g = torch.Generator().manual_seed(seed)
    bn = nn.BatchNorm2d(channels)
    with torch.no_grad():
        bn.weight.copy_(torch.rand(channels, generator=g) + 0.5)
        bn.bias.copy_(torch.randn(channels, generator=g) * 0.1)
        bn.running_mean.copy_(torch.randn(channels, generator=g))
        bn.running_var.copy_(torch.rand(channels, generator=g) + 0.5)
    if fused:
        bn.__class__ = FusedBatchNorm2d
    return bn


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want).norm() / want.norm().clamp_min(1e-12)).item()


def _run(bn, x, identity, relu, grad, fused):
    """Output, gradients (x, weight, bias, identity) and the running statistics after one step."""
    x = x.clone().requires_grad_()
    identity = identity.clone().requires_grad_() if identity is not None else None
    if fused:
        y = bn(x, identity=identity, relu=relu)
    else:  # what torchvision's blocks do
        y = bn(x)
        if identity is not None:
            y = y + identity
        if relu:
            y = F.relu(y)
    y.backward(grad.to(y.dtype))
    out = {"y": y, "dx": x.grad, "dweight": bn.weight.grad, "dbias": bn.bias.grad,
           "running_mean": bn.running_mean, "running_var": bn.running_var}
    if identity is not None:
        out["didentity"] = identity.grad
    return out, y


@needs_kernel
@pytest.mark.parametrize("relu,residual", [(False, False), (True, False), (True, True), (False, True)])
@pytest.mark.parametrize("shape", [(4, 24, 7, 5), (3, 64, 1, 1), (2, 300, 3, 4)])
def test_the_kernel_is_at_least_as_close_to_fp64_as_atens_modules(relu, residual, shape):
    torch.manual_seed(0)
    # an offset mean: the variance must not cancel
    x = (torch.randn(shape) * 2 + 3).to(torch.bfloat16).contiguous(memory_format=CL)
    identity = torch.randn_like(x) if residual else None
    grad = torch.randn_like(x)
    exact, _ = _run(_norm(shape[1], False).double(), x.double(), identity.double() if residual else None,
                    relu, grad, False)
    aten, _ = _run(_norm(shape[1], False), x, identity, relu, grad, False)
    bn = _norm(shape[1], True)
    ours, y = _run(bn, x, identity, relu, grad, True)
    assert type(y.grad_fn).__name__ == "_NormBackward"  # the kernel ran, not the fallback
    assert y.dtype == torch.bfloat16 and y.is_contiguous(memory_format=CL)
    assert int(bn.num_batches_tracked) == 1
    for name, want in exact.items():
        ours_err, aten_err = (_relative_error(got[name], want) for got in (ours, aten))
        # ATen rounds the normalized output to bf16 before the add and the ReLU; the kernel rounds once
        assert ours_err <= 1.05 * aten_err + 2e-6, name
        assert ours_err < 5e-3, name


@needs_kernel
def test_a_residual_relu_mask_matches_fp64_where_atens_rounding_does_not():
    """Gradients through a ReLU after a residual add: ATen's double rounding flips the mask of values
    near zero; the kernel's single rounding keeps its gradients within bf16's precision of fp64's."""
    torch.manual_seed(1)
    x = (torch.randn(4, 64, 8, 8) * 2 + 3).to(torch.bfloat16).contiguous(memory_format=CL)
    identity, grad = torch.randn_like(x), torch.randn_like(x)
    exact, _ = _run(_norm(64, False).double(), x.double(), identity.double(), True, grad, False)
    ours, _ = _run(_norm(64, True), x, identity, True, grad, True)
    err = (ours["dx"].double() - exact["dx"]).norm() / exact["dx"].norm()
    assert err < 5e-3


@pytest.mark.parametrize("case", ["eval", "fp32", "nchw", "no-running-stats"])
def test_where_the_kernel_does_not_apply_the_module_computes_atens_result(case):
    torch.manual_seed(0)
    x = torch.randn(4, 8, 5, 5)
    identity = torch.randn_like(x)
    if case != "fp32":
        x, identity = x.to(torch.bfloat16), identity.to(torch.bfloat16)
    if case != "nchw":
        x, identity = x.contiguous(memory_format=CL), identity.contiguous(memory_format=CL)
    plain, fused = _norm(8, False), _norm(8, True)
    for bn in (plain, fused):
        if case == "eval":
            bn.eval()
        if case == "no-running-stats":
            bn.momentum = None  # a cumulative average: ATen's
    want, _ = _run(plain, x, identity, True, torch.ones_like(x), False)
    got, y = _run(fused, x, identity, True, torch.ones_like(x), True)
    assert type(y.grad_fn).__name__ != "_NormBackward"
    for name in want:
        assert torch.equal(got[name], want[name]), name


def _blocks_model(block) -> ResNet:
    torch.manual_seed(0)
    return ResNet(block, [1, 1, 1, 1], num_classes=5)


@needs_kernel
@pytest.mark.parametrize("block", [BasicBlock, Bottleneck])
def test_a_fused_resnet_trains_as_the_plain_one_and_restores(block):
    plain = _blocks_model(block).to(memory_format=CL)
    fused = copy.deepcopy(plain)
    assert fused_norm.fuse(fused) == sum(isinstance(m, nn.BatchNorm2d) for m in plain.modules())
    assert type(fused) is ResNet  # the debugger names tensors after the model's class
    assert "_forward_impl" in fused.__dict__  # the stem's ReLU in its batch norm
    assert all(type(m) is not block for m in fused.modules())
    assert fused.state_dict().keys() == plain.state_dict().keys()
    x = torch.randn(6, 3, 64, 64).contiguous(memory_format=CL)
    outs = []
    for model, dtype in ((copy.deepcopy(plain).double(), None), (plain, torch.bfloat16), (fused, torch.bfloat16)):
        model.train()
        with torch.autocast("cpu", torch.bfloat16, enabled=dtype is not None):
            logits = model(x.to(torch.float64 if dtype is None else torch.float32))
        logits.double().square().mean().backward()
        outs.append({"logits": logits.double(), **{n: p.grad.double() for n, p in model.named_parameters()},
                     **{n: b.double() for n, b in model.named_buffers() if b.is_floating_point()}})
    exact, aten, ours = outs
    for name, want in exact.items():
        # bf16 through the whole network: the kernel must not drift from fp64 further than ATen does
        assert _relative_error(ours[name], want) <= 1.25 * _relative_error(aten[name], want) + 1e-3, name
    # evaluation runs ATen's modules: the same function as the plain model's, to the bit
    plain.eval(), fused.eval()
    with torch.no_grad():
        fused.load_state_dict(plain.state_dict())
        assert torch.equal(fused(x), plain(x))
    fused_norm.restore(fused)
    assert {type(m) for m in fused.modules()} == {type(m) for m in plain.modules()}
    assert "_forward_impl" not in fused.__dict__


@needs_kernel
def test_a_frozen_stem_keeps_its_statistics_in_a_fused_torchvision_resnet18():
    model = create_model("resnet18", 4).to(memory_format=CL)
    fused_norm.fuse(model)
    model.train()
    model.bn1.eval()  # a frozen stem keeps its statistics: ATen in eval mode
    before = model.bn1.running_mean.clone()
    with torch.autocast("cpu", torch.bfloat16):
        model(torch.randn(2, 3, 32, 32).contiguous(memory_format=CL)).float().sum().backward()
    assert torch.equal(model.bn1.running_mean, before)
    assert int(model.layer1[0].bn1.num_batches_tracked) == 1


def test_why_not_says_why():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert fused_norm.why_not("false", cpu, "bf16", True, False) == "fused-norm=false"
    assert "for CPUs" in fused_norm.why_not("auto", cuda, "bf16", True, False)
    assert "trains in fp32" in fused_norm.why_not("auto", cpu, "fp32", True, False)
    assert "channels-last=false" in fused_norm.why_not("auto", cpu, "bf16", False, False)
    assert "compile=true" in fused_norm.why_not("auto", cpu, "bf16", True, True)
    if fused_norm.library() is not None:
        assert fused_norm.why_not("auto", cpu, "bf16", True, False) is None


def test_without_a_compiler_the_job_keeps_atens_batch_norm(monkeypatch, tmp_path):
    monkeypatch.setattr(fused_norm, "KERNELS", native.Kernels(fused_norm.SOURCE, fused_norm._SIGNATURES))
    monkeypatch.setenv("CC", "/nonexistent/gcc")
    monkeypatch.setenv("IMGCLS_CACHE", str(tmp_path))  # nothing built before may be picked up
    assert fused_norm.library() is None
    assert "/nonexistent/gcc" in fused_norm.why_not("auto", torch.device("cpu"), "bf16", True, False)
    bn = _norm(8, True)
    x = torch.randn(2, 8, 3, 3).to(torch.bfloat16).contiguous(memory_format=CL)
    want, _ = _run(_norm(8, False), x, None, True, torch.ones_like(x), False)
    got, _ = _run(bn, x, None, True, torch.ones_like(x), True)
    assert torch.equal(got["y"], want["y"])


@needs_kernel
def test_the_kernels_share_torchs_openmp_runtime():
    """Linked to the runtime torch loaded, not the system's: one pool of threads on the cores."""
    runtime = native.openmp_runtime()
    assert runtime is not None and Path(torch.__file__).parent in runtime.parents  # a pip wheel bundles it
    fused_norm.library()
    mapped = {Path(line.split()[-1]).resolve() for line in Path("/proc/self/maps").read_text().splitlines()
              if len(line.split()) >= 6 and native.OPENMP_RUNTIME.match(Path(line.split()[-1]).name)}
    assert mapped == {runtime.resolve()}


@needs_kernel
def test_an_unwritable_cache_falls_back_to_the_temporary_directory(monkeypatch, tmp_path):
    monkeypatch.setattr(fused_norm, "KERNELS", native.Kernels(fused_norm.SOURCE, fused_norm._SIGNATURES))
    blocked = tmp_path / "not-a-directory"
    blocked.write_text("")
    monkeypatch.setenv("IMGCLS_CACHE", str(blocked))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    assert fused_norm.library() is not None, fused_norm.why_not_built()
    assert [p.name.startswith("fused_norm-") for p in (tmp_path / "tmp" / f"imgcls-{os.getuid()}").iterdir()] == [True]


def test_fused_norm_hyperparameter():
    assert parse({}).fused_norm == "auto"
    assert parse({"fused-norm": "False"}).fused_norm == "false"
    with pytest.raises(HyperparameterError, match="'fused-norm' = 'true' is not valid: expected one of auto, false"):
        parse({"fused-norm": "true"})


def test_a_checkpoint_resumes_across_fused_norm_settings(tmp_path):
    from train import checkpoint
    from train.hyperparams import Config

    old = {k: v for k, v in Config().as_hyperparameters().items() if k != "fused-norm"}
    for before in (parse({"fused-norm": "false"}).as_hyperparameters(), old):
        checkpoint.save(tmp_path, {"epoch": 1, "hyperparameters": before})
        assert checkpoint.load(tmp_path, Config().as_hyperparameters())["epoch"] == 1


@needs_kernel
@pytest.mark.parametrize("k,s,p,hw", [(3, 2, 1, (9, 8)), (3, 2, 1, (16, 16)), (2, 2, 0, (7, 6)), (3, 1, 1, (5, 7)),
                                      (3, 2, 0, (4, 9))])
def test_the_max_pool_gives_atens_output_and_gradients_at_least_as_exact(k, s, p, hw):
    torch.manual_seed(0)
    # few distinct values: ties, which go to the first position in the window as in ATen
    x = (torch.randn(2, 24, *hw) * 2).round().div(2).to(torch.bfloat16).contiguous(memory_format=CL)
    grad_shape = nn.MaxPool2d(k, s, p)(x.float()).shape
    g = torch.randn(grad_shape).to(torch.bfloat16).contiguous(memory_format=CL)
    pool = nn.MaxPool2d(k, s, p)
    runs = {}
    for name, module, dtype in (("exact", pool, torch.float64), ("aten", pool, torch.bfloat16),
                                ("ours", copy.deepcopy(pool), torch.bfloat16)):
        if name == "ours":
            fused_norm.fuse(module)
            assert type(module) is fused_norm.FusedMaxPool2d
        xi = x.to(dtype).detach().clone().requires_grad_()
        y = module(xi)
        y.backward(g.to(dtype))
        runs[name] = (y, xi.grad, y.grad_fn)
    assert type(runs["ours"][2]).__name__ == "_MaxPoolBackward"
    assert runs["ours"][0].is_contiguous(memory_format=CL)
    assert torch.equal(runs["ours"][0], runs["aten"][0])  # a max is exact: the same bits
    exact = runs["exact"][1]
    assert _relative_error(runs["ours"][1], exact) <= _relative_error(runs["aten"][1], exact) + 1e-7
    assert _relative_error(runs["ours"][1], exact) < 4e-3  # rounded once to bf16


def test_the_max_pool_without_a_gradient_is_atens():
    x = torch.randn(2, 8, 9, 9).to(torch.bfloat16).contiguous(memory_format=CL)
    pool = nn.MaxPool2d(3, 2, 1)
    fused = copy.deepcopy(pool)
    fused_norm.fuse(fused)
    with torch.no_grad():
        assert torch.equal(fused(x), pool(x))
    assert torch.equal(fused(x), pool(x))  # x needs no gradient: nothing to keep for a backward


@needs_kernel
def test_a_debugger_saving_relu_inputs_sees_them_at_its_save_steps_and_the_other_steps_run_fused(tmp_path):
    """relu_input needs each ReLU module to run, which a fused block does not call: the job runs
    ATen's modules at the steps smdebug saves (0, 3 and 6 with save_interval 3) and fuses the rest."""
    import json

    from smdebug.core.modes import ModeKeys
    from smdebug.trials import create_trial

    from train.debugger import Debugger
    from train.engine import Batcher, Precision, train_one_epoch

    config = tmp_path / "debughookconfig.json"
    config.write_text(json.dumps({
        "LocalPath": str(tmp_path / "tensors"), "HookParameters": {"save_interval": "3"},
        "CollectionConfigurations": [{"CollectionName": "losses"}, {"CollectionName": "relu_input",
                                      "CollectionParameters": {"include_regex": ".*relu_input"}}]}))
    torch.manual_seed(0)
    model = create_model("resnet18", 3).to(memory_format=CL)
    fused_norm.fuse(model)
    criterion = nn.CrossEntropyLoss()
    debugger = Debugger.create(config, model, criterion, base_dir=tmp_path)
    norms = fused_norm.AtSaveSteps(model)
    ran = []  # per step: whether the blocks ran fused
    model.layer1[0].register_forward_pre_hook(lambda m, _: ran.append(type(m) is not BasicBlock))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    batches = [(torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0])) for _ in range(7)]
    debugger.train_mode()
    train_one_epoch(model, batches, Batcher(torch.device("cpu"), None, True), criterion, optimizer,
                    torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0), Precision(torch.bfloat16, False, "bf16"),
                    None, 2, model.train, before_step=lambda: norms(debugger.saves_module_tensors_next()))
    norms.plain()
    debugger.close()
    fused_norm.restore(model)
    assert ran == [False, True, True, False, True, True, False]
    trial = create_trial(str(tmp_path / "tensors"))
    relu = [n for n in trial.tensor_names() if n.endswith("relu_input_0") and n.startswith("layer")]
    assert relu, trial.tensor_names()
    for name in relu:
        assert trial.tensor(name).steps(mode=ModeKeys.TRAIN) == [0, 3, 6], name
