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
from torch.utils.data import DataLoader, Dataset, Sampler

from imgcls.errors import ClassifierError
from imgcls.images import IMAGE_EXTENSIONS, is_image_name, open_image

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

    def _indices(self) -> list[int]:
        if not self.shuffle:
            return list(range(self.size))
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(self.size, generator=g).tolist()
        padding = -len(order) % self.world_size
        return order + (order * (padding // max(len(order), 1) + 1))[:padding]

    def __iter__(self):
        indices = self._indices()[self.rank::self.world_size]
        return iter([(self.epoch, i) for i in indices])

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


class ImageDataset(Dataset):
    """(transform(image), label); images come from the files, or from `cache` (train.cache) when given."""

    def __init__(self, samples: list[tuple[Path, int]], transform, seed: int = 0, cache=None):
        self.samples, self.transform, self.seed, self.cache = samples, transform, seed, cache

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key):
        epoch, index = key if isinstance(key, tuple) else (0, key)
        path, label = self.samples[index]
        seed_sample(self.seed, epoch, index)
        if self.cache is not None:
            return self.transform(self.cache[index]), label
        try:
            image = open_image(path, draft_size=getattr(self.transform, "decode_size", None))
        except ClassifierError as exc:  # the file changed after the scan
            raise DataError(f"{path} became unreadable during training: {exc}") from None
        return self.transform(image), label


def make_loader(channel: Channel, transform, batch_size: int, *, shuffle: bool, seed: int,
                workers: int, pin_memory: bool, drop_last: bool = False, rank: int = 0,
                world_size: int = 1, cache=None) -> DataLoader:
    sampler = EpochSampler(len(channel.samples), seed, shuffle, rank, world_size)
    return DataLoader(
        ImageDataset(channel.samples, transform, seed, cache), batch_size=batch_size, sampler=sampler,
        num_workers=workers, pin_memory=pin_memory, drop_last=drop_last,
        persistent_workers=workers > 0, prefetch_factor=4 if workers > 0 else None,
    )
