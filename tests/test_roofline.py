import pytest
import torch

from bench import roofline
from imgcls.models import create_model
from train import finetune


def model(arch: str, freeze: str):
    m = create_model(arch, 10)
    finetune.apply_freeze(m, finetune.frozen_prefixes(m, freeze))
    return m


def test_a_forward_counts_the_models_published_multiply_adds():
    # torchvision lists resnet18 at 1.81 and resnet50 at 4.09 G multiply-adds for a 224 px image
    frozen = create_model("resnet18", 1000).requires_grad_(False)
    assert roofline.step_gflop(frozen, 224) == pytest.approx(2 * 1.814, rel=0.01)
    frozen = create_model("resnet50", 1000).requires_grad_(False)
    assert roofline.step_gflop(frozen, 224) == pytest.approx(2 * 4.09, rel=0.01)


def test_a_training_step_counts_the_backward_that_runs():
    forward = roofline.step_gflop(create_model("resnet18", 10).requires_grad_(False), 64)
    full = roofline.step_gflop(model("resnet18", "none"), 64)
    # backward is two multiplies per forward one (input and weight gradients), except the first
    # convolution's input gradient, which nothing needs
    stem = 2 * 64 * 3 * 7 * 7 * 32 * 32 / 1e9
    assert full == pytest.approx(3 * forward - stem, rel=1e-3)
    # a frozen backbone adds only the head's weight gradient
    head = 2 * 512 * 10 / 1e9
    assert roofline.step_gflop(model("resnet18", "backbone"), 64) == pytest.approx(forward + head, rel=1e-3)


def test_the_matmul_rate_is_a_rate_of_the_multiplys_arithmetic():
    for precision in ("fp32", "bf16", "int8"):
        rate = roofline.matmul_rate(torch.device("cpu"), precision, 256, 3)
        # 2 x 256^3 FLOP take more than a microsecond and less than a second on any CPU
        assert 2 * 256**3 / 1e9 < rate < 2 * 256**3 / 1e3, (precision, rate)
    with pytest.raises(KeyError):
        roofline.matmul_rate(torch.device("cpu"), "int4", 256, 1)
