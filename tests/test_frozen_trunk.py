"""A frozen ResNet trunk as one frozen trace (train.frozen_trunk): which modules, the same function
and gradients as the eager model, the model's state untouched, and when a job leaves it off."""

import json

import pytest
import torch
from torch import nn

from imgcls.models import create_model
from train import finetune, frozen_trunk
from train.debugger import collections
from train.hyperparams import HyperparameterError, parse

STEM = ["conv1", "bn1", "relu", "maxpool"]


def _frozen(freeze: str, arch: str = "resnet18") -> tuple[nn.Module, list[str]]:
    torch.manual_seed(0)
    model = create_model(arch, 4)
    prefixes = finetune.frozen_prefixes(model, freeze)
    finetune.apply_freeze(model, prefixes)
    # BatchNorm statistics other than the initial ones: the trace must use the model's own
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    return model.to(memory_format=torch.channels_last), prefixes


def test_the_trunk_is_the_leading_frozen_part_of_a_resnet():
    assert frozen_trunk.trunk(_frozen("none")[0]) == []
    assert frozen_trunk.trunk(_frozen("stem")[0]) == STEM
    assert frozen_trunk.trunk(_frozen("layer2")[0]) == STEM + ["layer1", "layer2"]
    assert frozen_trunk.trunk(_frozen("backbone")[0]) == list(frozen_trunk.FORWARD)
    assert frozen_trunk.trunk(_frozen("backbone", "resnet50")[0]) == list(frozen_trunk.FORWARD)
    mobilenet = create_model("mobilenet_v3_small", 4)
    finetune.apply_freeze(mobilenet, finetune.frozen_prefixes(mobilenet, "backbone"))
    assert frozen_trunk.trunk(mobilenet) == []  # not a ResNet: its own forward stays


def _x(n=4):
    return torch.randn(n, 3, 64, 64, generator=torch.Generator().manual_seed(1)).contiguous(
        memory_format=torch.channels_last)


@pytest.mark.parametrize("freeze", ["stem", "layer2", "backbone"])
def test_the_traced_trunk_computes_the_eager_model_and_its_gradients(freeze):
    # float64: in fp32 the folded BatchNorm's rounding alone moved this random-init, batch-of-4
    # gradient by 0.5% in direction (1e-5 in norm); in float64 the two agree to 1e-14.
    eager, prefixes = _frozen(freeze)
    traced, _ = _frozen(freeze)
    eager.double()
    traced.double()
    state = {k: v.clone() for k, v in traced.state_dict().items()}
    frozen_trunk.attach(traced, frozen_trunk.trunk(traced), _x().double(), None)
    assert traced.frozen_trunk == tuple(frozen_trunk.trunk(eager))
    assert traced.state_dict().keys() == state.keys()
    assert all(torch.equal(traced.state_dict()[k], v) for k, v in state.items())
    y = torch.tensor([0, 1, 2, 3])
    outputs = []
    for model in (eager, traced):
        finetune.set_train_mode(model, prefixes)  # the trunk in eval mode, the rest training
        outputs.append(model(_x().double()))
        nn.functional.cross_entropy(outputs[-1], y).backward()
    torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-10, atol=1e-10)
    eager.eval()
    traced.eval()
    torch.testing.assert_close(traced(_x(6).double()), eager(_x(6).double()), rtol=1e-10, atol=1e-10)  # another batch size
    grads = {n: p.grad for n, p in eager.named_parameters() if p.requires_grad}
    assert grads and all(n.startswith(("layer", "fc")) for n in grads)
    for name, p in traced.named_parameters():
        if name in grads:
            torch.testing.assert_close(p.grad, grads[name], rtol=1e-8, atol=1e-10)
        else:
            assert p.grad is None
    frozen_trunk.detach(traced)
    assert "forward" not in traced.__dict__ and not hasattr(traced, "frozen_trunk")
    assert not hasattr(traced, "frozen_trunk_int8")


def test_under_bf16_autocast_the_trunk_answers_like_the_eager_model():
    eager, _ = _frozen("backbone")
    traced, _ = _frozen("backbone")
    frozen_trunk.attach(traced, frozen_trunk.trunk(traced), _x(), torch.bfloat16)
    eager.eval()
    traced.eval()
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        a, b = eager(_x(8)).float(), traced(_x(8)).float()
    assert (a - b).abs().max() <= 0.05 * a.abs().max()
    assert torch.equal(a.argmax(1), b.argmax(1))


def test_when_a_job_leaves_the_trunk_eager():
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert frozen_trunk.why_not("auto", cpu, False, None) is None
    assert frozen_trunk.why_not("auto", cpu, False, {"losses", "weights", "biases", "gradients"}) is None
    assert frozen_trunk.why_not("false", cpu, False, None) == "frozen-trunk=false"
    assert "only on a CPU" in frozen_trunk.why_not("auto", gpu, False, None)
    assert frozen_trunk.why_not("true", gpu, False, None) is None
    assert "compile=true" in frozen_trunk.why_not("true", cpu, True, None)
    assert frozen_trunk.why_not("int8", cpu, False, None) is None
    assert "quantized CPU kernels, not on cuda; use true" in frozen_trunk.why_not("int8", gpu, False, None)
    assert frozen_trunk.wants_int8("auto") and frozen_trunk.wants_int8("int8") and not frozen_trunk.wants_int8("true")
    why = frozen_trunk.why_not("auto", cpu, False, {"losses", "relu_input"})
    assert "saves the collections relu_input" in why and "save only losses, weights, biases and gradients" in why


def test_the_debugger_collections_come_from_its_config(tmp_path):
    config = tmp_path / "debughookconfig.json"
    assert collections(None) is None
    config.write_text(json.dumps({"LocalPath": "/x", "CollectionConfigurations": [
        {"CollectionName": "losses"}, {"CollectionName": "gradients"}]}))
    assert collections(config) == {"losses", "gradients"}
    config.write_text(json.dumps({"LocalPath": "/x"}))
    assert collections(config) == {"losses"}  # smdebug's own default
    config.write_text("{not json")
    assert collections(config) == {"all"}


def test_frozen_trunk_hyperparameter():
    assert parse({}).frozen_trunk == "auto"
    assert parse({"frozen-trunk": "False"}).frozen_trunk == "false"
    assert parse({"frozen-trunk": "INT8"}).frozen_trunk == "int8"
    with pytest.raises(HyperparameterError,
                       match="'frozen-trunk' = 'yes' is not valid: expected one of auto, true, false, int8"):
        parse({"frozen-trunk": "yes"})


def test_a_checkpoint_resumes_across_frozen_trunk_settings(tmp_path):
    """Only kernels change: a checkpoint of another setting, or of a trainer without it, resumes."""
    from train import checkpoint
    from train.hyperparams import Config

    now = Config().as_hyperparameters()
    for before in (parse({"frozen-trunk": "false"}).as_hyperparameters(),
                   {k: v for k, v in now.items() if k != "frozen-trunk"}):
        checkpoint.save(tmp_path, {"epoch": 1, "hyperparameters": before})
        assert checkpoint.load(tmp_path, now)["epoch"] == 1


def test_int8_error_is_the_distance_over_the_spread_between_images():
    reference = torch.tensor([[1.0, 0.0], [3.0, 0.0]])  # spread from the mean feature: norm sqrt(2); a 0.5 shift of both: sqrt(0.5)
    assert frozen_trunk.int8_error(reference, reference) == 0
    assert frozen_trunk.int8_error(reference, reference + torch.tensor([0.0, 0.5])) == pytest.approx(0.5)
    same = torch.ones(3, 4)  # every image the same feature: int8 has nothing to keep apart
    assert frozen_trunk.int8_error(same, same) == float("inf")


@pytest.mark.parametrize("freeze", ["layer2", "backbone"])
def test_the_int8_trunk_answers_like_fp32_and_trains_only_the_rest(freeze):
    model, prefixes = _frozen(freeze)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    names = frozen_trunk.trunk(model)
    calibration = [torch.randn(8, 3, 64, 64, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    quantized, error = frozen_trunk.quantized(model, names, iter(calibration))
    graph = quantized.graph
    # Random weights on noise images give features that barely differ between images, so the error
    # relative to that spread is larger than a trained backbone's (0.16-0.38 here, 0.05-0.11 for the
    # bench's trained backbones); the model's modes stay as they were.
    assert model.training and 0 < error < 1
    frozen_trunk.attach(model, names, _x(), torch.bfloat16, graph)
    assert model.frozen_trunk == tuple(names) and model.frozen_trunk_int8
    x = calibration[0][:4].contiguous(memory_format=torch.channels_last)
    model.eval()
    with torch.no_grad():
        expected = graph(x.contiguous())  # the int8 features, then the model's own trainable modules
        for name in frozen_trunk.FORWARD[len(names):]:
            expected = getattr(model, name)(expected)
        expected = model.fc(torch.flatten(expected, 1))
        got = model(x)
        with torch.autocast("cpu", torch.bfloat16):  # as a training step calls it
            cast = model(x).float()
    torch.testing.assert_close(got, expected)
    assert (cast - got).abs().max() <= 0.05 * got.abs().max()
    finetune.set_train_mode(model, prefixes)
    nn.functional.cross_entropy(model(x), torch.tensor([0, 1, 2, 3])).backward()
    trained = {n for n, p in model.named_parameters() if p.grad is not None}
    assert trained == {n for n, p in model.named_parameters() if p.requires_grad} and "fc.weight" in trained
    # the trunk's weights and statistics stay as they were, in fp32 (the trainable stages' BatchNorm
    # statistics move in a training step, as they should)
    kept = [k for k in state if k.split(".")[0] in names]
    assert kept and all(torch.equal(model.state_dict()[k], state[k]) for k in kept)
    assert all(model.state_dict()[k].dtype == v.dtype for k, v in state.items())
    frozen_trunk.detach(model)
    assert not hasattr(model, "frozen_trunk_int8")


@pytest.mark.parametrize("mode, limit, int8", [("auto", 10.0, True), ("auto", 0.0, False), ("int8", 0.0, True),
                                               ("true", 10.0, False)])
def test_a_job_keeps_the_int8_trunk_only_where_its_features_stay_close(mode, limit, int8, monkeypatch, caplog):
    from train.engine import choose_precision
    from train.hyperparams import Config
    from train.job import trace_trunk

    monkeypatch.setattr(frozen_trunk, "INT8_MAX_ERROR", limit)
    model, _ = _frozen("backbone")
    calibration = lambda: (torch.randn(8, 3, 64, 64, generator=torch.Generator().manual_seed(i)) for i in range(2))  # noqa: E731
    cfg = Config(batch_size=4, image_size=64, frozen_trunk=mode)
    with caplog.at_level("INFO", logger="train"):
        names, quantized = trace_trunk(cfg, model, torch.device("cpu"), choose_precision("bf16", torch.device("cpu")),
                                       None, calibration)
    assert names == list(frozen_trunk.FORWARD) and model.frozen_trunk_int8 == int8 == (quantized is not None)
    assert f"run as one frozen {'int8' if int8 else 'bf16'} trace" in caplog.text
    assert ("int8 calibrated on the training images" in caplog.text) == (mode != "true")
    assert ("that is more than 0.00: int8 kept, as frozen-trunk=int8 asks" in caplog.text) == (mode == "int8")
    assert ("that is more than 0.00: the float trace instead" in caplog.text) == (mode == "auto" and limit == 0)


def test_a_trunk_that_cannot_be_quantized_trains_on_as_a_float_trace(caplog):
    from train.engine import choose_precision
    from train.hyperparams import Config
    from train.job import trace_trunk

    model, _ = _frozen("backbone")
    with caplog.at_level("INFO", logger="train"):  # no calibration images at all
        names, quantized = trace_trunk(Config(batch_size=4, image_size=64), model, torch.device("cpu"),
                                       choose_precision("bf16", torch.device("cpu")), None, lambda: iter(()))
    assert names == list(frozen_trunk.FORWARD) and not model.frozen_trunk_int8 and quantized is None
    assert "quantizing the trunk failed (ValueError: int8 calibration needs at least one batch" in caplog.text
    assert "run as one frozen bf16 trace" in caplog.text


def test_a_frozen_backbones_int8_models_are_the_int8_trunks_with_its_head(tmp_path, monkeypatch):
    """int8_models: the artifact's int8 models from the int8 trunk (no second calibration), one per
    variant calibrate made; the one the head trained on (8-bit activations where the CPU has VNNI)
    computes the trained head on exactly the trunk's features; each read back as the server reads it;
    only where the trunk is every module before fc."""
    from imgcls import artifact, quantize

    calibration = [torch.randn(8, 3, 64, 64, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    for vnni in (False, True):
        if vnni and not quantize.available(quantize.FUSED_ENGINE):
            continue
        # the rule the trunk follows, either way on this CPU (the 8-bit model is built for onednn)
        monkeypatch.setattr(quantize, "vnni_ready", lambda vnni=vnni: vnni)
        monkeypatch.setattr(quantize, "build_engine", lambda vnni=vnni: quantize.FUSED_ENGINE if vnni else quantize.ENGINE)
        model, _ = _frozen("backbone")
        names = frozen_trunk.trunk(model)
        quantized, _ = frozen_trunk.quantized(model, names, iter(calibration))
        assert [quantize.needs_vnni(m) for m in quantized.modules] == ([False, True] if vnni else [False])
        assert quantize.needs_vnni(quantized.graph) == vnni  # the head trains on the nearest features
        frozen_trunk.attach(model, names, _x(), torch.bfloat16, quantized.graph)
        with torch.no_grad():  # the head trains after the trunk was quantized
            model.fc.weight.mul_(-2.0)
        frozen_trunk.detach(model)
        made = frozen_trunk.int8_models(model, quantized)
        assert [quantize.needs_vnni(g) for g in made] == ([False, True] if vnni else [False])
        x = _x(5)
        outputs = []
        for graph in made:
            artifact.save_int8(tmp_path, graph)
            served = quantize.Int8Model(artifact.load_int8(tmp_path, vnni=quantize.needs_vnni(graph)))
            with torch.no_grad():
                outputs.append(served(x))
        with torch.no_grad():
            expected = model.fc(torch.flatten(quantized.graph(x.contiguous()), 1))
            torch.testing.assert_close(outputs[-1], expected)
            if vnni:  # the 7-bit model: the same calibration, coarser activations
                assert not torch.equal(outputs[0], outputs[-1])
                assert (outputs[0] - expected).abs().max() <= 0.05 * expected.abs().max()
            # what calibrating the whole model again gives: one activation scale differs (the last block's
            # output shares its observer with the pooled features, which the whole model's flatten adds
            # to that histogram a second time), so close, not equal
            again = quantize.quantize(model, iter(calibration), "fc")(x.contiguous())
            assert (again - outputs[0]).abs().max() <= 0.05 * again.abs().max()
    assert frozen_trunk.int8_models(model, None) == []  # a float trunk: int8 calibrates the model
    partial, _ = _frozen("layer2")
    part = frozen_trunk.trunk(partial)
    assert frozen_trunk.int8_models(partial, frozen_trunk.quantized(partial, part, iter(calibration))[0]) == []
