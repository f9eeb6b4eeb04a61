import json

import pytest
import torch
import torchvision

from imgcls import artifact
from imgcls.errors import ArtifactError, WeightsError
from imgcls.models import create_model, extract_state_dict, imagenet_weights_path, load_weights
from imgcls.presets import ClassificationPresetEval, ClassificationPresetTrain


def test_factory_builds_a_new_head():
    m = create_model("resnet18", 7)
    assert m.fc.out_features == 7
    assert create_model("efficientnet_b0", 3).classifier[1].out_features == 3


def test_unknown_architecture():
    with pytest.raises(WeightsError, match="Unknown architecture 'resnet19'"):
        create_model("resnet19", 2)


def test_imagenet_weights_missing_and_present(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(WeightsError, match=r"PRETRAINED_ARCHS=\"resnet18\""):
        create_model("resnet18", 5, weights="imagenet")
    path = imagenet_weights_path("resnet18")
    assert path.parent == tmp_path / "hub" / "checkpoints"
    path.parent.mkdir(parents=True)
    donor = torchvision.models.resnet18()
    torch.save(donor.state_dict(), path)
    m = create_model("resnet18", 5, weights="imagenet")
    assert torch.equal(m.conv1.weight, donor.conv1.weight) and m.fc.out_features == 5


def test_weights_of_another_architecture_are_refused():
    with pytest.raises(WeightsError, match="check that the 'arch' hyperparameter"):
        load_weights(torchvision.models.resnet18(), torchvision.models.resnet34().state_dict(), "x")
    # resnet50's bottleneck blocks: the same key names as resnet18's, other shapes
    with pytest.raises(WeightsError, match=r"0 missing, \d+ unexpected, \d+ of another shape, e\.g\. "
                                           r"\['layer1\.0\.conv1\.weight \(64, 64, 1, 1\) in the file, \(64, 64, 3, 3\) here'"):
        load_weights(torchvision.models.resnet18(), torchvision.models.resnet50().state_dict(), "x")


def test_checkpoint_shapes_are_unwrapped():
    sd = torchvision.models.resnet18().state_dict()
    ddp = {f"module.{k}": v for k, v in sd.items()}
    assert extract_state_dict({"state_dict": ddp, "epoch": 3}).keys() == sd.keys()
    with pytest.raises(WeightsError, match="neither a state dict"):
        extract_state_dict({"epoch": 3})


def test_artifact_round_trip_predicts_the_same(tmp_path):
    torch.manual_seed(0)
    model = create_model("resnet18", 3).eval()
    preset = ClassificationPresetEval(48)
    card = artifact.ModelCard("resnet18", ["a", "b", "c"], preset.to_dict(), metrics={"valid_acc": 0.5})
    artifact.save(tmp_path, model, card)
    loaded, card2 = artifact.load(tmp_path)
    x = preset.normalize(torch.randint(0, 255, (2, 3, 48, 48), dtype=torch.uint8))
    with torch.inference_mode():
        torch.testing.assert_close(loaded(x), model(x))
    assert card2.class_names == ["a", "b", "c"] and card2.eval_preset().to_dict() == preset.to_dict()
    assert json.loads((tmp_path / "model.json").read_text())["num_classes"] == 3
    assert all((tmp_path / f).stat().st_mode & 0o777 == 0o644 for f in ("model.json", "model.pt"))


def _edit_card(model_dir, **changes):
    meta = json.loads((model_dir / "model.json").read_text())
    meta.update(changes)
    (model_dir / "model.json").write_text(json.dumps(meta))


@pytest.mark.parametrize("damage,fragment", [
    (lambda d: (d / "model.json").unlink(), "No model.json"),
    (lambda d: (d / "model.pt").unlink(), "No model.pt"),
    (lambda d: (d / "model.json").write_text("{"), "not valid JSON"),
    (lambda d: (d / "model.pt").write_bytes(b"garbage"), "cannot be read"),
    (lambda d: (d / "model.json").write_text(json.dumps({"format_version": 99})), "format_version 99"),
    (lambda d: _edit_card(d, class_names=["a", "b", "c"]), "does not match model.json"),
    (lambda d: _edit_card(d, arch="resnet34"), "does not match model.json"),
])
def test_damaged_artifacts_fail_loudly(tmp_path, damage, fragment):
    artifact.save(tmp_path, create_model("resnet18", 2), artifact.ModelCard(
        "resnet18", ["a", "b"], ClassificationPresetEval(32).to_dict()))
    damage(tmp_path)
    with pytest.raises(ArtifactError, match=fragment):
        artifact.load(tmp_path)


def test_presets_output_uint8_of_the_crop_size_and_normalize_on_the_batch():
    from PIL import Image

    img = Image.new("RGB", (120, 80), (255, 0, 0))
    for preset in (ClassificationPresetEval(64), ClassificationPresetTrain(64, "medium"),
                   ClassificationPresetTrain(64, "none")):
        out = preset(img)
        assert out.dtype == torch.uint8 and out.shape == (3, 64, 64)
    x = ClassificationPresetEval(64).normalize(torch.stack([out]), channels_last=True)
    assert x.dtype == torch.float32 and x.is_contiguous(memory_format=torch.channels_last)
    assert x[0, 0, 0, 0].item() == pytest.approx((1 - 0.485) / 0.229, rel=1e-3)
    assert ClassificationPresetEval(224).resize_size == 256


def test_normalize_in_place_gives_the_formulas_values_and_leaves_its_input():
    """(x - mean) * (1 / std) in fp32, rounded once to the dtype, in either layout; a float batch
    passed in comes back unchanged (the arithmetic runs in place, on a copy)."""
    preset = ClassificationPresetTrain(16)
    mean = torch.tensor(preset.mean).view(1, 3, 1, 1) * 255
    inv_std = 1.0 / (torch.tensor(preset.std).view(1, 3, 1, 1) * 255)
    batch = torch.randint(0, 256, (3, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    for x in (batch, batch.contiguous(memory_format=torch.channels_last)):
        for dtype in (torch.float32, torch.bfloat16):
            for channels_last in (False, True):
                got = preset.normalize(x, dtype, channels_last)
                assert torch.equal(got, ((x.float() - mean) * inv_std).to(dtype)) and got.dtype == dtype
                if channels_last:
                    assert got.is_contiguous(memory_format=torch.channels_last)
    floats = batch.float()
    preset.normalize(floats)
    assert torch.equal(floats, batch.float())
