"""gpu-decode's path, run on the CPU: the same crops and augmentation as the data-loader path."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from imgcls.presets import ClassificationPresetTrain
from train import data
from train.device_decode import DeviceDecoder, collate, make_loader
from train.synthetic import make_dataset


@pytest.fixture
def channel(tmp_path) -> data.Channel:
    make_dataset(tmp_path / "d", per_class=4, size=48, classes=3, seed=2)
    root = tmp_path / "d" / "train"
    # Not only plain RGB JPEGs: a PNG (decoded in the worker), a CMYK JPEG and a grayscale one.
    first = sorted((root / "circle").glob("*.jpg"))[0]
    Image.open(first).save(root / "circle" / "as_png.png")
    Image.open(first).convert("CMYK").save(root / "square" / "cmyk.jpg", quality=95)
    Image.open(first).convert("L").save(root / "triangle" / "gray.jpg", quality=95)
    return data.scan_channel("train", root, workers=1)


@pytest.mark.parametrize("augment", ["none", "light", "medium"])
def test_same_crops_as_the_worker_path(channel, augment):
    preset = ClassificationPresetTrain(32, augment)
    seed, epoch = 7, 3
    reference = data.ImageDataset(channel.samples, preset, seed)
    loader = make_loader(channel, batch_size=len(channel.samples), shuffle=True, seed=seed, workers=0)
    loader.sampler.set_epoch(epoch)
    batch, labels = next(iter(loader))
    assert sum(batch.jpeg) == len(channel.samples) - 1  # the PNG arrives decoded
    decoder = DeviceDecoder(torch.device("cpu"), preset, seed, channels_last=False)
    rng = torch.get_rng_state()
    crops = decoder.crops(batch)
    assert torch.equal(torch.get_rng_state(), rng)  # the training process's random stream is untouched
    for crop, label, key in zip(crops, labels, batch.keys, strict=True):
        expected, expected_label = reference[key]
        assert int(label) == expected_label
        # Same crop box and flip; libjpeg through PIL and through torchvision round alike or within a level.
        assert (crop.int() - expected.int()).abs().float().mean() < 2.0, key


def test_normalized_batch_and_labels(channel):
    preset = ClassificationPresetTrain(32, "light")
    loader = make_loader(channel, batch_size=4, shuffle=True, seed=1, workers=0, drop_last=True)
    batch, labels = next(iter(loader))
    x, y = DeviceDecoder(torch.device("cpu"), preset, 1, channels_last=True)(batch, labels)
    assert x.shape == (4, 3, 32, 32) and x.dtype == torch.float32 and x.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(y, labels)


def test_a_batch_the_decoder_refuses_decodes_on_the_cpu(channel, monkeypatch):
    import train.device_decode as dd

    def refuse(*args, **kwargs):
        raise RuntimeError("nvjpeg: unsupported stream")
    monkeypatch.setattr(dd, "decode_jpeg", refuse)
    preset = ClassificationPresetTrain(32, "none")
    batch, _ = collate([dd.EncodedImages(channel.samples)[(0, i)] for i in range(3)])
    crops = DeviceDecoder(torch.device("cpu"), preset, 0, False).crops(batch)
    assert crops.shape == (3, 3, 32, 32)


@pytest.mark.slow
def test_a_job_with_gpu_decode(tiny_data):
    """The trainer wires it in; with augment=none it trains on the same pixels (to decoder rounding)."""
    histories = {}
    for choice in ("true", "false"):
        tiny_data.hyperparameters(augment="none", cache_images="false", gpu_decode=choice, precision="fp32")
        result = tiny_data.run()
        assert result.returncode == 0, result.stdout[-3000:]
        assert ("gpu-decode: training JPEGs decode a batch at a time on cpu" in result.stdout) == (choice == "true")
        histories[choice] = json.loads((tiny_data.output_data / "metrics.json").read_text())["history"]
    for a, b in zip(histories["true"], histories["false"], strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], abs=0.02)
        assert a["valid_loss"] == pytest.approx(b["valid_loss"], abs=0.02)
