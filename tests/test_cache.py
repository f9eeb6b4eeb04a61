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
    full, reduced = cache.train_sizes(eval_preset)
    assert (full, reduced) == (74, 37)
    decoded = cache.DecodedImages([p for p, _ in channel.samples], cache.ShorterAtMost(full), 2)
    assert {tuple(t.shape) for t in decoded.images} == {(3, 74, 74)}  # 96 px brought down to twice the resize size
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


def test_cached_training_images_below_the_limit_are_exactly_the_uncached_path(tmp_path):
    """Images no larger than the train limit are kept as decoded: random crops see the same pixels as
    when every epoch decodes the files (the eval-size cache resampled them twice)."""
    channel = _channel(tmp_path, size=48)
    eval_preset = ClassificationPresetEval(32)
    train_preset = ClassificationPresetTrain(32, "light")
    caches = cache.decode_splits([p for p, _ in channel.samples], {}, eval_preset, 2,
                                 cache.train_sizes(eval_preset)[0])
    assert {tuple(t.shape) for t in caches["train"].images} == {(3, 48, 48)}
    plain = data.make_loader(channel, train_preset, 4, shuffle=True, seed=3, workers=0, pin_memory=False)
    cached = data.make_loader(channel, train_preset, 4, shuffle=True, seed=3, workers=0, pin_memory=False,
                              cache=caches["train"])
    for loader in (plain, cached):
        loader.sampler.set_epoch(2)
    for (a, la), (b, lb) in zip(_batches(plain), _batches(cached), strict=True):
        assert torch.equal(a, b) and torch.equal(la, lb)


def test_cached_images_are_kept_interleaved_and_crop_as_planar_ones_do(tmp_path):
    """HWC memory (the uint8 crop's fast layout), compact, resized or not; the crops are the same."""
    channel = _channel(tmp_path, size=96)
    train_preset = ClassificationPresetTrain(32, "light")
    for limit in (74, 200):  # resized, kept as decoded
        decoded = cache.DecodedImages([p for p, _ in channel.samples], cache.ShorterAtMost(limit), 2)
        for img in decoded.images:
            assert img.permute(1, 2, 0).is_contiguous() and img.untyped_storage().nbytes() == img.numel()
            torch.manual_seed(5)
            a = train_preset(img)
            torch.manual_seed(5)
            assert torch.equal(a, train_preset(img.contiguous()))


def test_auto_keeps_full_size_train_images_when_they_fit_then_the_eval_size_then_none(tmp_path):
    channel = _channel(tmp_path, size=96)  # 12 train images, 96 x 96
    train = [p for p, _ in channel.samples]
    eval_preset = ClassificationPresetEval(32)  # limits 74 and 37
    eval_bytes = 3 * 5 * 32 * 32
    full = 12 * 3 * 74 * 74 + eval_bytes
    reduced = 12 * 3 * 37 * 37 + eval_bytes
    assert cache.stored_bytes(train, 74) == 12 * 3 * 74 * 74
    assert cache.stored_bytes(train, 200) == 12 * 3 * 96 * 96  # smaller images are kept as they are
    assert cache.plan("auto", train, 5, eval_preset, available=4 * full)[0] == 74
    size, why = cache.plan("auto", train, 5, eval_preset, available=4 * full - 4)
    assert size == 37 and "resampled twice" in why
    assert cache.plan("auto", train, 5, eval_preset, copies=2, available=4 * full)[0] == 37  # two ranks' copies
    off, why = cache.plan("auto", train, 5, eval_preset, available=4 * reduced - 4)
    assert off is None and "decoding every epoch" in why
    assert cache.plan("true", train, 5, eval_preset, available=1)[0] == 37
    assert cache.plan("false", train, 5, eval_preset, available=10**12)[0] is None
