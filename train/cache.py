"""Decode once: a channel's images kept in memory as uint8 tensors, so that epochs after the first
skip JPEG decoding, the largest CPU cost of fine-tuning on small images.

What is kept is the deterministic prefix of each preset:
  - evaluation channels keep the eval preset's output itself (resize, center crop): exactly what
    the uncached path produces, so valid/test metrics and serving parity do not change;
  - the train channel keeps each image as decoded, its shorter side brought down to the train
    preset's decode size (twice the eval resize size) where it is larger: the pixels the uncached
    path crops from (up to its JPEG draft scaling). The random crop and flip run on that every epoch. Keeping the train images
    at the eval resize size instead (a quarter of the memory) resamples every crop twice: on drawn
    shapes (resnet18 from scratch, 10 epochs, seeds 3-5, AMX bf16) valid accuracy fell from 0.396
    to 0.299. That smaller size is only the fallback when the full one does not fit.

`cache-images=auto` caches when the estimate fits in a quarter of the memory available now.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2 as T

from imgcls.errors import ClassifierError
from imgcls.images import decode

MEMORY_SHARE = 0.25


class CacheError(ClassifierError):
    """A file could not be decoded while filling the cache."""


def resize_shorter(size: int, interpolation: str = "bilinear"):
    return T.Resize(size, interpolation=InterpolationMode(interpolation), antialias=True)


class ShorterAtMost:
    """Brings an image's shorter side down to `size`; smaller images are kept as they are."""

    def __init__(self, size: int, interpolation: str = "bilinear"):
        self.size, self.resize = size, resize_shorter(size, interpolation)

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        return img if min(img.shape[-2:]) <= self.size else self.resize(img)


def train_sizes(eval_preset) -> tuple[int, int]:
    """Shorter-side limits for the train channel, preferred first: the train preset's decode size
    (twice the eval resize size), then the eval resize size when that does not fit."""
    return 2 * eval_preset.resize_size, eval_preset.resize_size


def stored_bytes(paths: list[Path], shorter: int, sample: int = 64) -> int:
    """Estimated bytes of `paths` kept with the shorter side at most `shorter`, from the header sizes
    of up to `sample` of them spread over the list (opening a file reads only its header)."""
    if not paths:
        return 0
    picks = paths[:: max(1, len(paths) // sample)][:sample]
    areas = []
    for path in picks:
        try:
            with Image.open(path) as img:
                w, h = img.size
        except (OSError, ValueError):  # unreadable since the scan: the decoding reports it
            w = h = shorter
        scale = min(1.0, shorter / min(w, h))
        areas.append(round(w * scale) * round(h * scale))
    return 3 * len(paths) * sum(areas) // len(areas)


def plan(choice: str, train: list[Path], n_eval: int, eval_preset, copies: int = 1,
         available: int | None = None) -> tuple[int | None, str]:
    """(the train channel's shorter-side limit, or None to decode every epoch; the reason, for the log).
    copies: processes on this host that each keep their own (data-parallel ranks)."""
    if choice == "false":
        return None, "cache-images=false"
    available = psutil.virtual_memory().available if available is None else available
    budget = MEMORY_SHARE * available
    eval_bytes = 3 * n_eval * eval_preset.crop_size ** 2
    full, reduced = train_sizes(eval_preset)
    needed = {size: copies * (stored_bytes(train, size) + eval_bytes) for size in (full, reduced)}
    share = f"a quarter of the {available / 2**30:.1f} GiB available"
    if needed[full] <= budget:
        return full, f"about {needed[full] / 2**20:.0f} MiB fits in {share}"
    at_full = f"at a shorter side of {full} px it would need about {needed[full] / 2**30:.1f} GiB"
    if needed[reduced] <= budget or choice == "true":
        return reduced, (f"{'cache-images=true; ' if choice == 'true' else ''}{at_full}, more than {share}: "
                         f"train images kept at {reduced} px instead (about {needed[reduced] / 2**20:.0f} MiB), "
                         "so each random crop is resampled twice")
    return None, (f"about {needed[reduced] / 2**30:.1f} GiB even with train images at {reduced} px would not fit "
                  f"in {share}; decoding every epoch (cache-images=true keeps them anyway)")


def interleaved(img: torch.Tensor) -> torch.Tensor:
    """The CHW view of pixel-interleaved (HWC) memory, as an image is decoded. The uint8 resize of
    the random crop runs about twice as fast on it as on planar CHW memory, with the same output."""
    return img.permute(1, 2, 0).contiguous().permute(2, 0, 1)


class DecodedImages:
    """uint8 CHW tensors over interleaved memory, one per sample, each `prepare(decoded image)`;
    decoded by a thread pool (both of imgcls.images' decoders release the GIL)."""

    def __init__(self, paths: list[Path], prepare, threads: int, draft_size: int | None = None):
        def load(path: Path) -> torch.Tensor:
            try:
                return interleaved(prepare(decode(path, draft_size=draft_size)))
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


def decode_splits(train: list[Path], evals: dict[str, list[Path]], eval_preset, threads: int,
                  train_size: int) -> dict[str, DecodedImages]:
    """The train channel with its shorter side at most train_size (`plan`), evaluation channels as
    their exact eval crop."""
    draft = eval_preset.decode_size
    caches = {"train": DecodedImages(train, ShorterAtMost(train_size, eval_preset.interpolation), threads, draft)}
    caches.update({name: DecodedImages(paths, eval_preset, threads, draft) for name, paths in evals.items()})
    return caches
