"""Class-folder datasets: scan, validate every file, split, and load batches as uint8.

A channel is a folder of class folders (ImageFolder layout). Every candidate file is decoded
once up front, in parallel, so corrupt, truncated, empty and non-image files are skipped,
counted and named before training starts instead of killing a worker mid-epoch.
"""

from __future__ import annotations

import logging
import random
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate

from imgcls.errors import ClassifierError
from imgcls.images import IMAGE_EXTENSIONS, decode, is_image_name, open_image

from . import batch_crop

log = logging.getLogger("train")


class DataError(ClassifierError):
    """A channel cannot be used: missing, empty, or inconsistent with the others."""


@dataclass
class Channel:
    name: str
    root: Path
    classes: list[str]                      # class folder names, sorted
    samples: list[tuple[Path, int]]         # (file, index into `classes`)
    skipped: list[tuple[Path, str]] = field(default_factory=list)

    def class_counts(self, class_names: list[str]) -> dict[str, int]:
        counts = Counter(class_names[label] for _, label in self.samples)
        return {name: counts.get(name, 0) for name in class_names}


def _check_image(path: Path) -> str | None:
    """None when the file decodes, else the reason it will be skipped."""
    try:
        open_image(path, draft_size=64)
        return None
    except ClassifierError as exc:
        return str(exc).replace(f" {path}", "")


def scan_channel(name: str, root: Path, workers: int = 4) -> Channel:
    """Find and validate every image under root/<class>/..., skipping (and naming) bad files."""
    if not root.is_dir():
        raise DataError(f"The '{name}' channel folder {root} does not exist: pass it in the job's inputs.")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith((".", "__")))
    skipped: list[tuple[Path, str]] = [(p, "not inside a class folder") for p in sorted(root.iterdir())
                                       if p.is_file() and not p.name.startswith(".")]
    candidates: list[tuple[Path, int]] = []
    for label, cls in enumerate(classes):
        for path in sorted((root / cls).rglob("*")):
            if not path.is_file() or any(part.startswith(".") for part in path.relative_to(root).parts):
                continue
            if is_image_name(path.name):
                candidates.append((path, label))
            else:
                skipped.append((path, f"not an image file (extensions: {', '.join(sorted(IMAGE_EXTENSIONS))})"))
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:  # PIL releases the GIL while decoding
        reasons = list(pool.map(_check_image, [p for p, _ in candidates]))
    samples = [c for c, reason in zip(candidates, reasons, strict=True) if reason is None]
    skipped += [(c[0], reason) for c, reason in zip(candidates, reasons, strict=True) if reason is not None]
    channel = Channel(name, root, classes, samples, skipped)
    if skipped:
        log.warning("%s: skipped %d file(s) that cannot be used:", name, len(skipped))
        for path, reason in skipped[:50]:
            log.warning("  skipped %s: %s", path.relative_to(root), reason)
        if len(skipped) > 50:
            log.warning("  ... and %d more (all listed in skipped_files.txt of the output data)", len(skipped) - 50)
    if not samples:
        raise DataError(f"The '{name}' channel ({root}) has no usable image: it needs one folder per class "
                        f"with .jpg/.png/.bmp/.webp files inside ({len(classes)} class folder(s) and "
                        f"{len(skipped)} unusable file(s) found).")
    return channel


def check_class_sets(train: Channel, others: list[Channel]) -> None:
    if len(train.classes) < 2:  # the job would run, and learn that everything is the one class
        raise DataError(f"The 'train' channel ({train.root}) has one class folder ({train.classes[0]!r}): a "
                        "classifier needs at least two, one folder per class.")
    empty = [c for c, n in train.class_counts(train.classes).items() if n == 0]
    if empty:
        raise DataError(f"Class folder(s) {', '.join(str(train.root / c) for c in empty)} of the 'train' "
                        "channel have no usable image: add images or remove the folder(s).")
    for other in others:
        if other.classes != train.classes:
            only_train = sorted(set(train.classes) - set(other.classes))
            only_other = sorted(set(other.classes) - set(train.classes))
            raise DataError(
                f"The '{other.name}' channel ({other.root}) has other class folders than 'train' "
                f"({train.root}): only in train: {only_train or 'none'}; only in {other.name}: "
                f"{only_other or 'none'}. Every channel needs the same class folders."
            )


def split_train_valid(train: Channel, fraction: float, seed: int) -> tuple[Channel, Channel]:
    """Hold out `fraction` of each class (at least one image, never a whole class), seeded."""
    rng = random.Random(seed)
    by_class: dict[int, list] = {}
    for sample in train.samples:
        by_class.setdefault(sample[1], []).append(sample)
    kept, held = [], []
    for label in sorted(by_class):
        items = by_class[label][:]
        rng.shuffle(items)
        n_valid = min(len(items) - 1, max(1, round(len(items) * fraction)))
        held += items[:n_valid]
        kept += items[n_valid:]
    if not held:
        raise DataError("Too few images to hold out a validation set: add a 'valid' channel or more images.")
    return (Channel("train", train.root, train.classes, sorted(kept), train.skipped),
            Channel("valid", train.root, train.classes, sorted(held)))


def log_class_counts(channel: Channel) -> None:
    counts = channel.class_counts(channel.classes)
    values = [v for v in counts.values() if v] or [0]
    log.info("%s: %d images in %d classes (min %d, max %d per class, imbalance %.1fx)", channel.name,
             len(channel.samples), len(channel.classes), min(values), max(values), max(values) / max(1, min(values)))
    items = sorted(counts.items(), key=lambda kv: kv[1])
    shown = items if len(items) <= 20 else items[:5] + [("...", None)] + items[-5:]
    log.info("%s class counts: %s", channel.name,
             ", ".join(f"{k}={v}" if v is not None else k for k, v in shown))


class EpochSampler(Sampler):
    """Yields (epoch, index) so that each sample's augmentation is seeded by (seed, epoch, index).

    Data order and augmentation then depend on nothing but the seed and the epoch: not on the
    worker count, not on persistent workers, and not on where a resumed job restarted.

    With several ranks each takes every world_size-th index of the epoch's order, so the k-th
    batches of all ranks together are the k-th batch a single process would train on with the
    global batch size. A shuffled (training) order is padded from its start to a multiple of
    world_size: every rank runs the same number of steps, which DDP needs. An evaluation order
    is not padded, so that each image is counted once.
    """

    def __init__(self, size: int, seed: int, shuffle: bool, rank: int = 0, world_size: int = 1):
        self.size, self.seed, self.shuffle = size, seed, shuffle
        self.rank, self.world_size, self.epoch = rank, world_size, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _indices(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(self.size))
        g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        order = torch.randperm(self.size, generator=g).tolist()
        padding = -len(order) % self.world_size
        return order + (order * (padding // max(len(order), 1) + 1))[:padding]

    def keys(self, epoch: int) -> list[tuple[int, int]]:
        """This rank's (epoch, index) keys of `epoch`, in order."""
        return [(epoch, i) for i in self._indices(epoch)[self.rank::self.world_size]]

    def __iter__(self):
        return iter(self.keys(self.epoch))

    def __len__(self) -> int:
        total = self.size + (-self.size % self.world_size if self.shuffle else 0)
        return len(range(self.rank, total, self.world_size))


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of one sample's augmentation in one epoch (every decoding path uses it)."""
    return (seed * 1_000_003 + epoch * 100_003 + index) % 2**63


def seed_sample(seed: int, epoch: int, index: int) -> None:
    """Seeds the CPU generator that the transforms draw from, and only that one: torch.manual_seed
    also queues a seeding for each accelerator backend, formatting the Python stack every time
    (0.2 ms an image here, a sixth of a cached 128 px crop)."""
    torch.default_generator.manual_seed(sample_seed(seed, epoch, index))


def identity(image):
    """The transform of a channel whose cache already holds the preset's output."""
    return image


class Collated(tuple):
    """(images, labels): a batch that ImageDataset.__getitems__ already put together."""


def collate(items):
    """The loaders' collate_fn: a Collated batch as it is, a list of samples stacked."""
    return list(items) if isinstance(items, Collated) else default_collate(items)


class ImageDataset(Dataset):
    """(transform(image), label); images come from the files, or from `cache` (train.cache) when given.
    A batch of cached images for the train preset at augment=light is cropped in one call
    (train.batch_crop), to the same pixels; by_batch=False keeps the crops image by image. normalize:
    a preset whose normalize such a batch then comes out through (float32 channels-last, the same
    values), for a Batcher on the CPU; other batches stay uint8."""

    def __init__(self, samples: list[tuple[Path, int]], transform, seed: int = 0, cache=None, by_batch: bool = True,
                 normalize=None):
        self.samples, self.transform, self.seed, self.cache = samples, transform, seed, cache
        self.normalize = normalize
        self.crops_batches = by_batch and cache is not None and batch_crop.why_not(transform) is None

    def __getitems__(self, keys: list) -> list | Collated:
        if not self.crops_batches or not batch_crop.faster_here():
            return [self[key] for key in keys]
        images, boxes, flips, labels = [], [], [], []
        for key in keys:
            epoch, index = key if isinstance(key, tuple) else (0, key)
            seed_sample(self.seed, epoch, index)
            image = self.cache[index]
            box, flip = self.transform.draw(*image.shape[-2:])
            images.append(image), boxes.append(box), flips.append(flip), labels.append(self.samples[index][1])
        size = (self.transform.crop_size, self.transform.crop_size)
        return Collated((batch_crop.crop_resize(images, boxes, flips, size, self.normalize), torch.tensor(labels)))

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key):
        epoch, index = key if isinstance(key, tuple) else (0, key)
        path, label = self.samples[index]
        seed_sample(self.seed, epoch, index)
        if self.cache is not None:
            return self.transform(self.cache[index]), label
        try:
            image = decode(path, draft_size=getattr(self.transform, "decode_size", None))
        except ClassifierError as exc:  # the file changed after the scan
            raise DataError(f"{path} became unreadable during training: {exc}") from None
        return self.transform(image), label


# Where a job on a GPU copies its batches into page-locked memory, which lets their copies to the
# device run alongside its work: "thread", the data loader's pin_memory thread, or "main", the
# training thread (Batcher(pin=True)); "off" leaves them pageable. bench.loader_probe and the
# training bench's pin-* configurations time the three. The loader's thread takes the GIL for each
# batch it receives and pins, from a training thread that needs it to queue the GPU's work: resnet50
# full fine-tuning on an H200 trained 16% faster end to end with the training thread pinning.
GPU_PINNING = "main"
PINNINGS = ("thread", "main", "off")


def pinning(mode: str, on_gpu: bool) -> tuple[bool, bool]:
    """(make_loader's pin_memory, Batcher's pin) for a pinning mode; neither off a GPU."""
    if mode not in PINNINGS:
        raise ValueError(f"pinning is one of {', '.join(PINNINGS)}, got {mode!r}")
    return on_gpu and mode == "thread", on_gpu and mode == "main"


class EpochBatches(Sampler):
    """The batches of (epoch, index) keys of epoch `start`, then of the epochs after it, without end."""

    def __init__(self, sampler: EpochSampler, batch_size: int, drop_last: bool, start: int):
        self.sampler, self.batch_size, self.drop_last, self.start = sampler, batch_size, drop_last, start
        per_epoch = len(sampler)
        self.steps = per_epoch // batch_size if drop_last else -(-per_epoch // batch_size)

    def __iter__(self):
        epoch = self.start
        while self.steps:  # no batch in an epoch: nothing to yield, ever
            keys = self.sampler.keys(epoch)
            for step in range(self.steps):
                yield keys[step * self.batch_size:(step + 1) * self.batch_size]
            epoch += 1


class RunAhead:
    """A training loader for a whole run: one DataLoader iterator over EpochBatches, so that the
    workers go on into the next epoch's batches while an epoch's last steps, its evaluation and its
    checkpoint run. A loader started afresh each epoch keeps the first step waiting for a worker to
    make a whole batch: 0.13-0.16 s for 128 images at 224 px with 16 workers on an H200's host, a
    fifth of a 20-step resnet50 epoch. `epoch(e)` yields epoch e's batches; an epoch other than the
    one after the last finished one (the first, a resumed run, an epoch left unfinished) starts a
    new iterator there. Batches are the same as a per-epoch loader's: EpochSampler's keys."""

    def __init__(self, dataset: Dataset, sampler: EpochSampler, batch_size: int, drop_last: bool, **loader_args):
        self.dataset, self.sampler, self.batch_size, self.drop_last = dataset, sampler, batch_size, drop_last
        self.loader_args = loader_args
        self.steps = EpochBatches(sampler, batch_size, drop_last, 0).steps
        self._batches, self._next = None, None

    def __len__(self) -> int:
        return self.steps

    def epoch(self, epoch: int):
        if self._batches is None or epoch != self._next:
            self._batches = None  # its workers shut down before the next ones start
            self._batches = iter(DataLoader(self.dataset, batch_sampler=EpochBatches(
                self.sampler, self.batch_size, self.drop_last, epoch), **self.loader_args))
        self._next = None  # until this epoch's last batch is taken
        return self._take(epoch)

    def close(self) -> None:
        """Shuts the workers down (the next `epoch` starts new ones)."""
        self._batches, self._next = None, None

    def _take(self, epoch: int):
        for _ in range(self.steps):
            yield next(self._batches)
        self._next = epoch + 1


def epoch_batches(loader, epoch: int):
    """The batches of `epoch` from a RunAhead or a plain loader over an EpochSampler."""
    if isinstance(loader, RunAhead):
        return loader.epoch(epoch)
    if hasattr(loader.sampler, "set_epoch"):
        loader.sampler.set_epoch(epoch)
    return loader


def loader(dataset: Dataset, sampler: EpochSampler, batch_size: int, *, workers: int, pin_memory: bool = False,
           drop_last: bool = False, collate_fn=None, run_ahead: bool = False):
    """A DataLoader over `sampler`, or with run_ahead a RunAhead (a training run's loader)."""
    args = {"num_workers": workers, "pin_memory": pin_memory, "collate_fn": collate_fn or collate,
            "prefetch_factor": 4 if workers > 0 else None}
    if run_ahead:
        return RunAhead(dataset, sampler, batch_size, drop_last, **args)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=drop_last,
                      persistent_workers=workers > 0, **args)


def make_loader(channel: Channel, transform, batch_size: int, *, shuffle: bool, seed: int,
                workers: int, pin_memory: bool, drop_last: bool = False, rank: int = 0,
                world_size: int = 1, cache=None, run_ahead: bool = False, by_batch: bool = True, normalize=None):
    """run_ahead: a RunAhead, for a training run's train channel. by_batch, normalize: as ImageDataset's."""
    sampler = EpochSampler(len(channel.samples), seed, shuffle, rank, world_size)
    return loader(ImageDataset(channel.samples, transform, seed, cache, by_batch, normalize), sampler, batch_size, workers=workers,
                  pin_memory=pin_memory, drop_last=drop_last, run_ahead=run_ahead)
