"""Decode once: a channel's images kept in memory as resized uint8 tensors, so that epochs after
the first skip JPEG decoding, the largest CPU cost of fine-tuning on small images.

What is kept is the deterministic prefix of each preset:
  - evaluation channels keep the eval preset's output itself (resize, center crop): exactly what
    the uncached path produces, so valid/test metrics and serving parity do not change;
  - the train channel keeps each image resized to the eval resize size (shorter side), and the
    random crop and flip run on that every epoch. Crops then start from at most that resolution
    (for a 224 crop, a 256-pixel shorter side) instead of the original file's.

`cache-images=auto` caches when the estimate fits in a quarter of the memory available now.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2 as T

from imgcls.errors import ClassifierError
from imgcls.images import open_image

MEMORY_SHARE = 0.25


class CacheError(ClassifierError):
    """A file could not be decoded while filling the cache."""


def resize_shorter(size: int, interpolation: str = "bilinear"):
    return T.Resize(size, interpolation=InterpolationMode(interpolation), antialias=True)


def estimate_bytes(n_train: int, n_eval: int, resize_size: int, crop_size: int) -> int:
    """Train images at 4:3 with the shorter side at resize_size, eval images as their crop."""
    return 3 * (n_train * resize_size * (resize_size * 4 // 3) + n_eval * crop_size * crop_size)


def should_cache(choice: str, needed: int, available: int | None = None) -> tuple[bool, str]:
    """(cache or not, the reason, for the log)."""
    available = psutil.virtual_memory().available if available is None else available
    if choice == "false":
        return False, "cache-images=false"
    if choice == "true":
        return True, "cache-images=true"
    if needed <= MEMORY_SHARE * available:
        return True, f"about {needed / 2**20:.0f} MiB fits in a quarter of the {available / 2**30:.1f} GiB available"
    return False, (f"about {needed / 2**30:.1f} GiB would not fit in a quarter of the {available / 2**30:.1f} GiB "
                   "available; decoding every epoch")


class DecodedImages:
    """uint8 CHW tensors, one per sample, each `prepare(decoded image)`; decoded by a thread pool
    (Pillow releases the GIL while decoding)."""

    def __init__(self, paths: list[Path], prepare, threads: int, draft_size: int | None = None):
        def load(path: Path) -> torch.Tensor:
            try:
                image = open_image(path, draft_size=draft_size)
                return prepare(T.functional.pil_to_tensor(image)).contiguous()
            except ClassifierError as exc:  # the file changed after the scan
                raise CacheError(f"{path} became unreadable before training: {exc}") from None

        start = time.perf_counter()
        with ThreadPoolExecutor(max(1, threads)) as pool:
            self.images = list(pool.map(load, paths))
        self.seconds = time.perf_counter() - start
        self.nbytes = sum(t.numel() for t in self.images)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.images[index]


def decode_splits(train: list[Path], evals: dict[str, list[Path]], eval_preset, threads: int) -> dict[str, DecodedImages]:
    """The train channel resized to the eval resize size, evaluation channels as their exact eval crop."""
    draft = eval_preset.decode_size
    caches = {"train": DecodedImages(train, resize_shorter(eval_preset.resize_size, eval_preset.interpolation),
                                     threads, draft)}
    caches.update({name: DecodedImages(paths, eval_preset, threads, draft) for name, paths in evals.items()})
    return caches
