import pytest
import torch
import torchvision
from torch import nn

from train import finetune


def resnet():
    return torchvision.models.resnet18(num_classes=4)


def trainable(model):
    return {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}


def test_backbone_leaves_only_the_head():
    m = resnet()
    prefixes = finetune.frozen_prefixes(m, "backbone")
    finetune.apply_freeze(m, prefixes)
    assert trainable(m) == {"fc"}


def test_backbone_of_a_nested_head():
    m = torchvision.models.mobilenet_v3_small(num_classes=4)
    finetune.apply_freeze(m, finetune.frozen_prefixes(m, "backbone"))
    assert {n for n, p in m.named_parameters() if p.requires_grad} == {"classifier.3.weight", "classifier.3.bias"}


def test_freeze_up_to_a_stage():
    m = resnet()
    finetune.apply_freeze(m, finetune.frozen_prefixes(m, "layer2"))
    assert trainable(m) == {"layer3", "layer4", "fc"}
    assert finetune.frozen_prefixes(resnet(), "none") == []


def test_stage_freeze_on_a_non_resnet_is_explained():
    with pytest.raises(finetune.FreezeError, match="use freeze=backbone"):
        finetune.frozen_prefixes(torchvision.models.mobilenet_v3_small(), "layer2")


def test_frozen_batchnorm_statistics_do_not_move():
    m = resnet()
    prefixes = finetune.frozen_prefixes(m, "backbone")
    finetune.apply_freeze(m, prefixes)
    before = m.bn1.running_mean.clone()
    finetune.set_train_mode(m, prefixes)
    m(torch.randn(2, 3, 32, 32) * 5 + 3)
    assert torch.equal(m.bn1.running_mean, before) and m.fc.training


def test_no_weight_decay_on_norms_and_biases():
    m = resnet()
    groups = finetune.param_groups(m, 0.05)
    decayed = {id(p) for p in groups[0]["params"]}
    assert groups[0]["weight_decay"] == 0.05 and groups[1]["weight_decay"] == 0.0
    assert id(m.conv1.weight) in decayed and id(m.fc.weight) in decayed
    assert id(m.bn1.weight) not in decayed and id(m.fc.bias) not in decayed
    assert sum(len(g["params"]) for g in groups) == len(list(m.parameters()))


@pytest.mark.parametrize("name,cls", [("sgd", torch.optim.SGD), ("adam", torch.optim.Adam),
                                      ("adamw", torch.optim.AdamW), ("rmsprop", torch.optim.RMSprop)])
def test_optimizers(name, cls):
    opt = finetune.make_optimizer(name, finetune.param_groups(resnet(), 1e-4), 0.1, 0.9, 1e-7)
    assert isinstance(opt, cls) and opt.param_groups[0]["lr"] == 0.1


@pytest.mark.parametrize("name", ["sgd", "adam", "adamw"])
def test_fused_optimizers_make_the_same_update_as_the_plain_ones(name, monkeypatch):
    torch.manual_seed(0)
    models = [resnet(), resnet()]
    models[1].load_state_dict(models[0].state_dict())
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0])
    fused = finetune.make_optimizer(name, finetune.param_groups(models[0], 1e-2), 0.05, 0.9, 1e-8)
    monkeypatch.setattr(finetune, "fusable", lambda groups: False)
    plain = finetune.make_optimizer(name, finetune.param_groups(models[1], 1e-2), 0.05, 0.9, 1e-8)
    assert fused.defaults["fused"] is True and not plain.defaults["fused"]
    # Two steps on one backward's gradients: a second forward would see models that differ by
    # rounding, which Adam's normalization lifts to full-size steps on near-zero gradients.
    for model, opt in ((models[0], fused), (models[1], plain)):
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt.step()
    for a, b in zip(models[0].parameters(), models[1].parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_parameters_that_no_fused_kernel_takes_step_unfused():
    assert not finetune.fusable([{"params": [nn.Parameter(torch.zeros(2, dtype=torch.float64)).to("meta")]}])
    assert not finetune.fusable([{"params": []}])
    assert finetune.fusable(finetune.param_groups(resnet(), 1e-4))


def test_warmup_then_cosine():
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = finetune.warmup_cosine(opt, total_steps=100, warmup_steps=10)
    lrs = []
    for _ in range(100):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.01)
    assert lrs[:10] == sorted(lrs[:10]) and lrs[10] == pytest.approx(1.0)
    assert lrs[10:] == sorted(lrs[10:], reverse=True) and lrs[-1] < 0.02
