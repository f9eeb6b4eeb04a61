"""The model as the endpoint runs it (imgcls.inference): same answers as the eager model."""

from __future__ import annotations

import io

import pytest
import torch
from PIL import Image

from imgcls import artifact
from imgcls.errors import ImageDecodeError
from imgcls.inference import InferenceModel, resolve_mode
from imgcls.models import create_model
from imgcls.presets import ClassificationPresetEval
from serve.predictor import Predictor
from serve.settings import Settings, SettingsError


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    net = create_model("resnet18", num_classes=4).eval().to(memory_format=torch.channels_last)
    # Non-trivial BatchNorm statistics, so that folding them into the convolutions is exercised.
    for mod in net.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.5, 0.5)
            mod.running_var.uniform_(0.5, 2.0)
    return net


def _batch(n: int) -> torch.Tensor:
    return torch.randn(n, 3, 48, 48, generator=torch.Generator().manual_seed(n)).to(memory_format=torch.channels_last)


def test_frozen_trace_matches_eager_at_other_batch_sizes(model):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    served = InferenceModel(model, _batch(1), None, "jit")
    assert served.mode == "jit"
    for n in (1, 3, 8):
        x = _batch(n)
        with torch.no_grad():
            reference = model(x)
        out = served(x)
        assert out.dtype == torch.float32 and out.shape == (n, 4)
        assert torch.allclose(out, reference, atol=1e-4), (out - reference).abs().max()
    # Tracing and freezing work on a copy: the trainer's model (saved afterwards) is untouched.
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_frozen_bf16_close_to_eager_autocast(model):
    x = _batch(6)
    served = InferenceModel(model, x[:1], torch.bfloat16, "jit")
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        eager = model(x).float()
    out = served(x)
    assert out.dtype == torch.float32
    # bf16 has 8 bits of mantissa; folding BatchNorm before the cast changes the rounding only.
    assert torch.allclose(out, eager, atol=0.1, rtol=0.05), (out - eager).abs().max()


def test_modes_resolve_per_device():
    assert resolve_mode("auto", torch.device("cpu")) == "jit"
    assert resolve_mode("auto", torch.device("cuda", 0)) == "eager"
    assert resolve_mode("inductor", torch.device("cpu")) == "inductor"
    with pytest.raises(ValueError, match="not one of auto, jit, inductor, eager"):
        resolve_mode("fast", torch.device("cpu"))


def test_eager_mode_runs_the_module_itself(model):
    x = _batch(2)
    served = InferenceModel(model, x[:1], None, "eager")
    assert served.graph is None
    with torch.no_grad():
        assert torch.equal(served(x), model(x))


def test_compile_setting_is_checked():
    assert Settings.from_env({}).compile == "auto"
    assert Settings.from_env({"IMGCLS_COMPILE": "Eager"}).compile == "eager"
    with pytest.raises(SettingsError, match="IMGCLS_COMPILE='turbo' is not one of auto, jit, inductor, eager"):
        Settings.from_env({"IMGCLS_COMPILE": "turbo"})


@pytest.mark.slow
def test_inductor_matches_eager(model):
    """torch.compile with freezing, the opt-in mode: compiles here (C++ compiler), same answers."""
    x = _batch(2)
    served = InferenceModel(model, x[:1], None, "inductor")
    with torch.no_grad():
        reference = model(x)
    assert torch.allclose(served(x), reference, atol=1e-3)


def _jpeg(shade: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (shade, 255 - shade, shade // 2)).save(buf, "JPEG")
    return buf.getvalue()


def test_a_request_in_chunks_answers_as_one_batch_and_names_a_bad_image_by_its_place_in_the_request(model):
    card = artifact.ModelCard(arch="resnet18", class_names=list("abcd"), preprocess=ClassificationPresetEval(48).to_dict())
    whole, chunked = (Predictor(model, card, precision="fp32", chunk_size=size, compile="eager") for size in (32, 2))
    images = [_jpeg(40 * i) for i in range(5)]
    assert torch.allclose(torch.from_numpy(chunked.predict(images)), torch.from_numpy(whole.predict(images)), atol=1e-5)
    images[3] = b"not a picture"
    for predictor in (whole, chunked):
        with pytest.raises(ImageDecodeError, match=r"^Image 3 of 5: "):
            predictor.predict(images)
