import io

import pytest
import torch
import torchvision
from torch import nn
from torch.profiler import ProfilerActivity, profile

from train import finetune, memory_order

NAMES = ["sgd", "adam", "adamw"]
X, Y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0])


def resnets(count: int, channels_last: bool = True) -> list[nn.Module]:
    torch.manual_seed(0)
    models = [torchvision.models.resnet18(num_classes=4) for _ in range(count)]
    for m in models[1:]:
        m.load_state_dict(models[0].state_dict())
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return [m.to(memory_format=fmt) for m in models]


def optimizer(name: str, model: nn.Module, plain: bool = False):
    """plain: the same fused optimizer stepping the weights themselves."""
    return finetune.make_optimizer(name, finetune.param_groups(model, 1e-2), 0.05, 0.9, 1e-8, views=not plain)


def written(state_dict: dict) -> dict:
    """Through a file, as a checkpoint goes (a state dict holds the optimizer's live tensors)."""
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return torch.load(buffer)


def backward(model: nn.Module, scale: float = 1.0) -> None:
    (scale * nn.functional.cross_entropy(model(X), Y)).backward()


def test_flat_is_a_view_of_memory_in_memory_order():
    t = torch.arange(2 * 3 * 2 * 2.0).view(2, 3, 2, 2).contiguous(memory_format=torch.channels_last)
    view = memory_order.flat(t)
    assert view.data_ptr() == t.data_ptr() and view.shape == (24,)
    assert torch.equal(view, t.permute(0, 2, 3, 1).reshape(-1))
    assert memory_order.flat(torch.zeros(4, 4).t()) is None  # neither layout: left to the kernel
    assert memory_order.stepped_flat(nn.Parameter(t)) and not memory_order.stepped_flat(nn.Parameter(t.contiguous()))


@pytest.mark.parametrize("name", NAMES)
def test_channels_last_weights_step_as_views_and_update_as_the_plain_optimizer(name):
    ours, plain_model = resnets(2)
    fused = optimizer(name, ours)
    plain = optimizer(name, plain_model, plain=True)
    assert isinstance(fused, memory_order.InMemoryOrder) and fused.defaults["fused"] is True
    assert not isinstance(plain, memory_order.InMemoryOrder) and plain.defaults["fused"] is True
    # The 3x3 and 7x7 weights step as views of the model's own memory; the rest as themselves.
    assert {v.data_ptr() for v in fused.weights} == {p.data_ptr() for p in fused.weights.values()}
    assert len(fused.weights) == sum(p.dim() == 4 and p.shape[-1] > 1 for p in ours.parameters())
    for step in range(3):  # zero_grad between steps: a stale gradient would add up
        for model, opt in ((ours, fused), (plain_model, plain)):
            opt.zero_grad(set_to_none=step % 2 == 0)
            backward(model)
            opt.step()
    for (n, a), b in zip(ours.named_parameters(), plain_model.parameters(), strict=True):
        assert torch.equal(a, b), n  # the same kernel on the same numbers
        assert a.is_contiguous(memory_format=torch.channels_last) or a.dim() != 4


def test_contiguous_weights_and_the_unfused_path_are_left_alone(monkeypatch):
    assert not isinstance(optimizer("sgd", resnets(1, channels_last=False)[0]), memory_order.InMemoryOrder)
    monkeypatch.setattr(finetune, "fusable", lambda groups: False)
    assert not isinstance(optimizer("adamw", resnets(1)[0]), memory_order.InMemoryOrder)
    assert isinstance(optimizer("rmsprop", resnets(1)[0]), torch.optim.RMSprop)


@pytest.mark.parametrize("name", NAMES)
def test_no_gradient_copy_inside_the_fused_kernel(name):
    """The point of the views: the same fused kernel on the weights themselves copies every
    channels-last gradient (should a torch upgrade drop that copy, this module can go)."""
    model = resnets(1)[0]
    ours = optimizer(name, model)
    kernel_alone = optimizer(name, model, plain=True)
    copies = {}
    for label, opt in (("views", ours), ("weights", kernel_alone)):
        backward(model)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            opt.step()
        kernel = [e for e in prof.events() if e.name.startswith("aten::_fused_")]
        assert kernel, "the fused kernel did not run"
        copies[label] = sum(c.name in ("aten::contiguous", "aten::clone") for e in kernel for c in e.cpu_children)
        opt.zero_grad()
    assert copies["views"] == 0 and copies["weights"] >= len(ours.weights)


def test_checkpoints_hold_the_state_as_the_plain_optimizers_do_and_load_either_way():
    ours_model, plain_model, resumed_model, other_model = resnets(4)
    ours, plain = optimizer("adamw", ours_model), optimizer("adamw", plain_model, plain=True)
    for model, opt in ((ours_model, ours), (plain_model, plain)):
        backward(model)
        opt.step()
    saved, plain_saved = written(ours.state_dict()), written(plain.state_dict())
    assert saved["state"].keys() == plain_saved["state"].keys()
    for i, state in saved["state"].items():
        for key in ("exp_avg", "exp_avg_sq"):
            assert state[key].stride() == plain_saved["state"][i][key].stride()
            assert torch.equal(state[key], plain_saved["state"][i][key])
    # Resumed from the plain optimizer's checkpoint by ours, and from ours by the plain one: each
    # next step agrees with the step of the optimizer that wrote the checkpoint.
    resumed = optimizer("adamw", resumed_model)
    other = optimizer("adamw", other_model, plain=True)
    for model, opt, checkpoint in ((resumed_model, resumed, plain_saved), (other_model, other, saved)):
        model.load_state_dict(ours_model.state_dict())
        opt.load_state_dict(checkpoint)
    assert all(resumed.state[v]["exp_avg"].shape == v.shape for v in resumed.weights)
    for model, opt in ((ours_model, ours), (resumed_model, resumed), (other_model, other)):
        opt.zero_grad()
        backward(model, 2.0)
        opt.step()
    for a, b, c in zip(ours_model.parameters(), resumed_model.parameters(), other_model.parameters(), strict=True):
        assert torch.equal(b, a) and torch.equal(c, a)


def test_a_weight_moved_after_the_optimizer_was_made_is_an_error():
    model = resnets(1)[0]
    opt = optimizer("sgd", model)
    model.to(memory_format=torch.contiguous_format)
    backward(model)
    with pytest.raises(RuntimeError, match="make the optimizer after the model's last move"):
        opt.step()


def test_a_gradient_in_another_layout_than_its_weight_is_taken_in_the_weights_order(monkeypatch):
    """A gradient set by hand in the contiguous layout: the fused kernel, which reads memory in
    order, would pair each weight with another element's gradient; the view gets it reordered."""
    ours_model, reference_model = resnets(2)
    ours = optimizer("sgd", ours_model)
    monkeypatch.setattr(finetune, "fusable", lambda groups: False)
    reference = optimizer("sgd", reference_model)
    for model, opt in ((ours_model, ours), (reference_model, reference)):
        torch.manual_seed(1)
        for p in model.parameters():
            p.grad = torch.randn(p.shape)  # contiguous, whatever the weight's layout
        opt.step()
    for a, b in zip(ours_model.parameters(), reference_model.parameters(), strict=True):
        torch.testing.assert_close(a, b)
