"""The 'pretrained' channel (train.weights): what it takes, and what it says about what it cannot."""

from __future__ import annotations

import io
import tarfile

import pytest
import torch
import torchvision

from imgcls import artifact
from imgcls.errors import WeightsError
from imgcls.models import create_model
from imgcls.presets import ClassificationPresetEval
from train import weights


def test_an_earlier_jobs_model_tar_gz_gives_its_weights(tmp_path):
    model = create_model("resnet18", 3)
    job_out = tmp_path / "model"
    artifact.save(job_out, model, artifact.ModelCard(arch="resnet18", class_names=list("abc"),
                                                     preprocess=ClassificationPresetEval(32).to_dict()))
    channel = tmp_path / "pretrained"
    channel.mkdir()
    with tarfile.open(channel / "model.tar.gz", "w:gz") as tar:
        for path in job_out.iterdir():
            tar.add(path, arcname=path.name)
    state, source = weights.load_pretrained_channel(channel)
    assert torch.equal(state["conv1.weight"], model.state_dict()["conv1.weight"])


@pytest.mark.parametrize("name,body,words", [
    ("model.tar.gz", b"not an archive", "is not a readable tar.gz archive"),
    ("model.tar.gz", None, "is not a readable tar.gz archive"),  # cut short in the copy
    ("weights.pth", b"garbage", "cannot be loaded by torch.load"),
    ("notes.txt", b"hello", "holds no weights file"),
])
def test_a_channel_it_cannot_use_is_said_plainly(tmp_path, name, body, words):
    if body is None:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w:gz") as tar:
            data = b"x" * 100_000
            info = tarfile.TarInfo("model.pt")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        body = buf.getvalue()[: len(buf.getvalue()) // 2]
    (tmp_path / name).write_bytes(body)
    with pytest.raises(WeightsError, match=words):
        weights.load_pretrained_channel(tmp_path)


def test_weights_of_another_architecture_name_the_file_and_the_shapes(tmp_path):
    torch.save(torchvision.models.resnet50().state_dict(), tmp_path / "w.pth")
    init, state, source = weights.resolve("pretrained", tmp_path)
    with pytest.raises(WeightsError) as err:
        create_model("resnet18", 3, weights=init, state_dict=state, source=source)
    message = str(err.value)
    assert "The weights from the 'pretrained' channel (" in message and "w.pth" in message
    assert "layer1.0.conv1.weight (64, 64, 1, 1) in the file, (64, 64, 3, 3) here" in message
