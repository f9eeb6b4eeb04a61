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
    with pytest.raises(HyperparameterError, match="'frozen-trunk' = 'yes' is not valid: expected one of auto, true, false"):
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
