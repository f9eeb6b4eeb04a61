"""A batch's random crops in one call (train.batch_crop, train/crop_resize.c): every vector path
gives torchvision's pixels, the batch is the preset image by image, and where the kernel cannot be
built the crops stay image by image."""

from __future__ import annotations

import platform
import random
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader
from torchvision.transforms.v2 import functional as F

from imgcls.presets import ClassificationPresetTrain
from train import batch_crop, data, native
from train.cache import interleaved

needs_kernel = pytest.mark.skipif(batch_crop.KERNELS.library() is None,
                                  reason=f"no kernel: {batch_crop.KERNELS.why_not_built()}")
CL = torch.channels_last


def _cpu_has(flag: str) -> bool:
    try:
        return any(line.startswith("flags") and flag in line.split() for line in Path("/proc/cpuinfo").open())
    except OSError:
        return False


def _targets():
    """The vector paths this machine can build and run: native, AVX2 without AVX-512, neither."""
    targets = [("native", native.CFLAGS)]
    if platform.machine() == "x86_64":
        march = lambda m: tuple(f"-march={m}" if f == "-march=native" else f for f in native.CFLAGS)  # noqa: E731
        if _cpu_has("avx2"):
            targets.append(("x86-64-v3", march("x86-64-v3")))
        targets.append(("x86-64", march("x86-64")))
    return targets


def _torchvision(image, box, flip, size):
    out = F.resize_image(F.crop_image(image, *box), list(size), antialias=True)
    return F.horizontal_flip_image(out) if flip else out


def _cases(seed: int, count: int):
    """Random images (interleaved and planar) and boxes, with the edges a vector path could get
    wrong: boxes on the last row and column of the image's memory, crops narrower than the filter,
    enlargements, output widths that are no multiple of 8, no resize along one side or either."""
    rng, g = random.Random(seed), torch.Generator().manual_seed(seed)
    for _ in range(count):
        h_img, w_img = rng.randint(2, 300), rng.randint(2, 300)
        image = torch.randint(0, 256, (3, h_img, w_img), dtype=torch.uint8, generator=g)
        if rng.random() < 0.8:
            image = interleaved(image)
        h, w = rng.randint(1, h_img), rng.randint(1, w_img)
        top = h_img - h if rng.random() < 0.3 else rng.randint(0, h_img - h)
        left = w_img - w if rng.random() < 0.3 else rng.randint(0, w_img - w)
        size = rng.choice([(32, 32), (64, 96), (37, 131), (h, w), (h, 48), (40, w), (128, 128)])
        yield image, (top, left, h, w), rng.random() < 0.5, size


@needs_kernel
@pytest.mark.parametrize("name,cflags", _targets(), ids=[t[0] for t in _targets()])
def test_every_vector_path_gives_torchvisions_pixels(monkeypatch, name, cflags):
    kernels = native.Kernels(batch_crop.SOURCE, batch_crop.SIGNATURES, cflags)
    assert kernels.library() is not None, kernels.why_not_built()
    paths = kernels.library().imgcls_crop_resize_paths()
    if name == "native" and _cpu_has("avx512vbmi"):
        assert paths & batch_crop.PERMUTE
    if name == "x86-64-v3":
        assert paths == batch_crop.GATHER
    if name == "x86-64":
        assert paths == 0
    monkeypatch.setattr(batch_crop, "KERNELS", kernels)
    mismatched = []
    for i, (image, box, flip, size) in enumerate(_cases(7, 160)):
        got = batch_crop.crop_resize([image], [box], [flip], size)
        want = _torchvision(image, box, flip, size)
        assert got.shape == (1, 3, *size) and got.is_contiguous(memory_format=CL)
        if not torch.equal(got[0], want):
            mismatched.append((i, tuple(image.shape), box, flip, size, (got[0].int() - want.int()).abs().max().item()))
    assert not mismatched, mismatched[:5]


@needs_kernel
def test_a_batch_of_photo_sized_crops_is_exact_across_threads():
    """The train preset's own boxes on 292 x 389 images (a 500 x 375 photo kept at twice the resize
    size), many images to a call, so that the cores split the batch."""
    preset = ClassificationPresetTrain(128)
    g = torch.Generator().manual_seed(3)
    images = [interleaved(torch.randint(0, 256, (3, 292, 389), dtype=torch.uint8, generator=g)) for _ in range(24)]
    torch.manual_seed(0)
    draws = [preset.draw(292, 389) for _ in images]
    batch = batch_crop.crop_resize(images, [d[0] for d in draws], [d[1] for d in draws], (128, 128))
    for image, (box, flip), got in zip(images, draws, batch, strict=True):
        assert torch.equal(got, _torchvision(image, box, flip, (128, 128)))


def test_the_presets_draws_are_random_resized_crops():
    """draw() takes RandomResizedCrop's boxes and RandomHorizontalFlip's coin from the same state of
    torch's generator, the central fallback included (images too narrow or too flat for any box)."""
    preset = ClassificationPresetTrain(32)
    fallbacks = 0
    for h, w in ((75, 100), (100, 60), (8, 120), (300, 9), (5, 5)):
        image = torch.zeros(3, h, w, dtype=torch.uint8)
        for seed in range(60):
            torch.manual_seed(seed)
            box, flip = preset.draw(h, w)
            after = torch.rand(1)
            torch.manual_seed(seed)
            want = preset._crop.make_params([image])
            coin = torch.rand(1).item() < 0.5
            assert box == (want["top"], want["left"], want["height"], want["width"]) and flip == coin
            assert torch.equal(after, torch.rand(1))  # as many draws: the next sample's are the same
            fallbacks += (h, w) in ((8, 120), (300, 9)) and box[2:] != (h, w)
    assert fallbacks > 0


@needs_kernel
def test_a_box_outside_its_image_is_a_clear_error():
    image = interleaved(torch.zeros(3, 20, 30, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"crop box \(15, 0, 10, 10\) is not inside image 1 of the batch \(\(3, 20, 30\)\)"):
        batch_crop.crop_resize([image, image], [(0, 0, 10, 10), (15, 0, 10, 10)], [False, False], (8, 8))
    with pytest.raises(ValueError, match=r"image 0 of the batch is torch.float32 of shape \(3, 20, 30\): the crop "
                                         r"takes RGB images as uint8 \(3, height, width\)"):
        batch_crop.crop_resize([image.float()], [(0, 0, 10, 10)], [False], (8, 8))


def _cached_dataset(augment="light", by_batch=True, count=10):
    g = torch.Generator().manual_seed(5)
    images = [interleaved(torch.randint(0, 256, (3, 40 + 3 * i, 70 - 2 * i), dtype=torch.uint8, generator=g))
              for i in range(count)]
    samples = [(Path(f"/nonexistent/{i}.jpg"), i % 3) for i in range(count)]
    return data.ImageDataset(samples, ClassificationPresetTrain(32, augment), seed=4, cache=images, by_batch=by_batch)


@needs_kernel
def test_a_batch_is_the_preset_image_by_image():
    batched, single = _cached_dataset(), _cached_dataset(by_batch=False)
    assert batched.crops_batches and not single.crops_batches
    for epoch in (0, 1):
        keys = [(epoch, i) for i in (3, 0, 9, 4, 4)]
        images, labels = data.collate(batched.__getitems__(keys))
        want_images, want_labels = data.collate(single.__getitems__(keys))
        assert images.is_contiguous(memory_format=CL) and images.dtype == torch.uint8
        assert torch.equal(images, want_images) and torch.equal(labels, want_labels)
    again, _ = data.collate(batched.__getitems__([(0, 3)]))
    other, _ = data.collate(batched.__getitems__([(1, 3)]))
    assert not torch.equal(again, other)  # seeded per epoch and sample


@needs_kernel
def test_a_batch_normalized_in_the_kernel_is_the_batchers_normalize():
    """On a CPU the train loader's batch comes out normalized (float32, channels-last), with the
    values the Batcher's normalize gives the uint8 batch; the Batcher then only moves it."""
    from train.engine import Batcher

    preset = ClassificationPresetTrain(32)
    plain, normalized = _cached_dataset(), _cached_dataset()
    normalized.normalize = preset
    keys = [(2, i) for i in (1, 8, 5)]
    images, labels = data.collate(plain.__getitems__(keys))
    floats, same_labels = data.collate(normalized.__getitems__(keys))
    assert images.dtype == torch.uint8 and floats.dtype == torch.float32 and torch.equal(labels, same_labels)
    for channels_last in (True, False):
        batcher = Batcher(torch.device("cpu"), preset.normalize, channels_last)
        want, _ = batcher(images, labels)
        got, _ = batcher(floats, labels)
        assert torch.equal(got, want) and got.is_contiguous(memory_format=CL if channels_last else torch.contiguous_format)
    for size in ((32, 32), (19, 45)):  # widths whose rows are no multiple of the kernel's 16 pixels
        imgs = [normalized.cache[i] for i in range(4)]
        torch.manual_seed(9)
        draws = [preset.draw(*im.shape[-2:]) for im in imgs]
        boxes, flips = [d[0] for d in draws], [d[1] for d in draws]
        got = batch_crop.crop_resize(imgs, boxes, flips, size, normalize=preset)
        want = preset.normalize(batch_crop.crop_resize(imgs, boxes, flips, size), channels_last=True)
        assert torch.equal(got, want) and got.is_contiguous(memory_format=CL)


@needs_kernel
def test_without_byte_permutations_one_thread_crops_image_by_image(monkeypatch):
    """The gathers alone (AVX2) lose to torch's resize on one thread (a loader worker's): there the
    batch is cropped image by image, and the Batcher normalizes it; with two threads, in one call."""
    if platform.machine() != "x86_64" or not _cpu_has("avx2"):
        pytest.skip("builds the AVX2 path")
    march = tuple("-march=x86-64-v3" if f == "-march=native" else f for f in native.CFLAGS)
    monkeypatch.setattr(batch_crop, "KERNELS", native.Kernels(batch_crop.SOURCE, batch_crop.SIGNATURES, march))
    dataset = _cached_dataset()
    dataset.normalize = dataset.transform
    keys = [(0, 1), (0, 6)]
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert not batch_crop.faster_here()
        images, _ = data.collate(dataset.__getitems__(keys))
        torch.set_num_threads(2)
        assert batch_crop.faster_here()
        floats, _ = data.collate(dataset.__getitems__(keys))
    finally:
        torch.set_num_threads(threads)
    assert images.dtype == torch.uint8 and floats.dtype == torch.float32
    assert torch.equal(dataset.transform.normalize(images, channels_last=True), floats)
    if _cpu_has("avx512vbmi"):
        monkeypatch.setattr(batch_crop, "KERNELS", native.Kernels(batch_crop.SOURCE, batch_crop.SIGNATURES))
        torch.set_num_threads(1)
        try:
            assert batch_crop.faster_here()
        finally:
            torch.set_num_threads(threads)


def test_other_augmentations_and_uncached_channels_crop_image_by_image():
    assert not _cached_dataset("medium").crops_batches
    assert batch_crop.why_not(ClassificationPresetTrain(32, "heavy")) == \
        "augment=heavy: other random transforms follow the crop, image by image"
    assert batch_crop.why_not(ClassificationPresetTrain(32, "none")) == "augment=none: no random crop"
    assert batch_crop.why_not(ClassificationPresetTrain(32, interpolation="bicubic")) == \
        "interpolation=bicubic: the kernel resizes as bilinear does"
    uncached = data.ImageDataset([(Path("/nonexistent/0.jpg"), 0)], ClassificationPresetTrain(32))
    assert not uncached.crops_batches


def test_without_a_compiler_the_crops_stay_image_by_image(monkeypatch, tmp_path):
    monkeypatch.setenv("CC", "/nonexistent/gcc")
    monkeypatch.setenv("IMGCLS_CACHE", str(tmp_path))  # nothing built before may be picked up
    monkeypatch.setattr(batch_crop, "KERNELS", native.Kernels(batch_crop.SOURCE, batch_crop.SIGNATURES))
    assert "/nonexistent/gcc" in batch_crop.why_not(ClassificationPresetTrain(32))
    dataset = _cached_dataset()
    assert not dataset.crops_batches
    images, labels = data.collate(dataset.__getitems__([(0, 1), (0, 2)]))
    assert images.shape == (2, 3, 32, 32) and labels.tolist() == [1, 2]


@needs_kernel
def test_a_forked_loader_worker_crops_after_the_parent_used_the_kernel():
    """The kernel's OpenMP region runs in a data-loader worker forked after the parent ran it on
    several threads (GNU OpenMP's pool does not survive a fork): the worker's batches arrive."""
    dataset = _cached_dataset()
    torch.set_num_threads(2)
    data.collate(dataset.__getitems__([(0, i) for i in range(10)]))  # the parent's pool is up
    sampler = data.EpochSampler(len(dataset), seed=4, shuffle=True)
    loader = DataLoader(dataset, batch_size=4, sampler=sampler, num_workers=1, collate_fn=data.collate,
                        multiprocessing_context="fork", timeout=120)
    got = [(x.clone(), y.clone()) for x, y in loader]
    want = [data.collate(dataset.__getitems__(keys)) for keys in
            [sampler.keys(0)[i:i + 4] for i in range(0, len(dataset), 4)]]
    assert len(got) == len(want) == 3
    for (a, la), (b, lb) in zip(got, want, strict=True):
        assert torch.equal(a, b) and torch.equal(la, lb)
