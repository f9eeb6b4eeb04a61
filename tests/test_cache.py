"""Decode once (train.cache): the cached eval path equals the uncached one, the train path keeps its
augmentation, and `auto` caches only what fits."""

from __future__ import annotations

import torch

from imgcls.presets import ClassificationPresetEval, ClassificationPresetTrain
from train import cache, data
from train.synthetic import make_dataset


def _channel(tmp_path, size=48):
    make_dataset(tmp_path, per_class=4, size=size, classes=3, test_per_class=0, seed=2)
    return data.scan_channel("train", tmp_path / "train", workers=2)


def _batches(loader):
    return [(x.clone(), y.clone()) for x, y in loader]


def test_cached_evaluation_is_exactly_the_uncached_path(tmp_path):
    channel = _channel(tmp_path)
    preset = ClassificationPresetEval(32)
    decoded = cache.DecodedImages([p for p, _ in channel.samples], preset, threads=2)
    assert decoded.nbytes == len(channel.samples) * 3 * 32 * 32
    plain = data.make_loader(channel, preset, 5, shuffle=False, seed=0, workers=0, pin_memory=False)
    cached = data.make_loader(channel, data.identity, 5, shuffle=False, seed=0, workers=0, pin_memory=False,
                              cache=decoded)
    for (a, la), (b, lb) in zip(_batches(plain), _batches(cached), strict=True):
        assert torch.equal(a, b) and torch.equal(la, lb)


def test_cached_training_images_are_augmented_from_the_resized_image(tmp_path):
    channel = _channel(tmp_path, size=96)
    eval_preset = ClassificationPresetEval(32)
    train_preset = ClassificationPresetTrain(32, "light")
    decoded = cache.DecodedImages([p for p, _ in channel.samples], cache.resize_shorter(eval_preset.resize_size), 2)
    assert {tuple(t.shape) for t in decoded.images} == {(3, 37, 37)}  # shorter side at the eval resize size
    loader = data.make_loader(channel, train_preset, 4, shuffle=True, seed=1, workers=1, pin_memory=False,
                              cache=decoded)
    loader.sampler.set_epoch(0)
    first = _batches(loader)
    again = _batches(loader)
    loader.sampler.set_epoch(1)
    other = _batches(loader)
    assert all(x.shape == (4, 3, 32, 32) and x.dtype == torch.uint8 for x, _ in first)
    assert all(torch.equal(a, b) for (a, _), (b, _) in zip(first, again, strict=True))  # seeded per epoch
    assert not all(torch.equal(a, b) for (a, _), (b, _) in zip(first, other, strict=True))  # still random


def test_auto_caches_what_fits_in_a_quarter_of_free_memory():
    needed = cache.estimate_bytes(1000, 200, 256, 224)
    assert needed == 3 * (1000 * 256 * 341 + 200 * 224 * 224)
    assert cache.should_cache("auto", needed, available=8 * needed)[0]
    off, why = cache.should_cache("auto", needed, available=2 * needed)
    assert not off and "decoding every epoch" in why
    assert cache.should_cache("true", needed, available=1)[0]
    assert not cache.should_cache("false", 1, available=10**12)[0]
