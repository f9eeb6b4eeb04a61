"""JPEG decoding on the training device, a batch at a time (`gpu-decode=true`).

Data-loader workers then only read files: each batch goes to `torchvision.io.decode_jpeg` as
one list, on the GPU through nvJPEG. Each image is then cropped and augmented there by the same
preset the CPU path uses. The random parameters come from the CPU generator, seeded per sample
exactly as `train.data.ImageDataset` seeds it, so a sample gets the same crop and flip on either
path. Files that are not JPEG, and a batch that nvJPEG refuses (CMYK, a stream it cannot parse),
are decoded on the CPU with the trainer's own decoder instead: the job goes on.

Where it pays: when decoding, not the model, limits the step (many small CPUs per GPU is the
opposite case), and the images are not kept decoded in memory (`cache-images`). On an H200 with
16 CPUs it did not pay: 0.31 of the in-memory rate against 0.54 for the 16 workers decoding
(resnet50, docs/benchmarks.md). On CPU it runs the same code for the tests.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset
from torchvision.io import ImageReadMode, decode_jpeg

from imgcls.images import decode

from .data import Channel, EpochSampler, loader, seed_sample

JPEG_MAGIC = b"\xff\xd8\xff"


@dataclass
class EncodedBatch:
    """A batch as the workers hand it over: per sample its file bytes (JPEG) or its decoded
    uint8 CHW image (anything else), and the (epoch, index) that seeds its augmentation."""
    payloads: list[torch.Tensor]
    keys: list[tuple[int, int]]
    jpeg: list[bool]

    def __len__(self) -> int:
        return len(self.payloads)


class EncodedImages(Dataset):
    def __init__(self, samples: list[tuple[Path, int]]):
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key):
        epoch, index = key
        path, label = self.samples[index]
        data = Path(path).read_bytes()
        if data[:3] == JPEG_MAGIC:
            return torch.frombuffer(bytearray(data), dtype=torch.uint8), label, key, True
        return _cpu_decode(data), label, key, False


def collate(items) -> tuple[EncodedBatch, torch.Tensor]:
    payloads, labels, keys, jpeg = zip(*items, strict=True)
    return EncodedBatch(list(payloads), list(keys), list(jpeg)), torch.tensor(labels)


def make_loader(channel: Channel, batch_size: int, *, shuffle: bool, seed: int, workers: int, drop_last: bool = False,
                rank: int = 0, world_size: int = 1, run_ahead: bool = False):
    """The loader of encoded batches: the same sampler (order, sharding, padding) as train.data's."""
    return loader(EncodedImages(channel.samples), EpochSampler(len(channel.samples), seed, shuffle, rank, world_size),
                  batch_size, workers=workers, drop_last=drop_last, collate_fn=collate, run_ahead=run_ahead)


class DeviceDecoder:
    """Takes the place of engine.Batcher: encoded batch in, normalized batch on the device out."""

    def __init__(self, device: torch.device, preset, seed: int, channels_last: bool):
        self.device, self.preset, self.seed, self.channels_last = device, preset, seed, channels_last

    def decode(self, batch: EncodedBatch) -> list[torch.Tensor]:
        jpegs = [p for p, j in zip(batch.payloads, batch.jpeg, strict=True) if j]
        try:
            decoded = iter(decode_jpeg(jpegs, mode=ImageReadMode.RGB, device=self.device,
                                       apply_exif_orientation=True)) if jpegs else iter(())
        except RuntimeError:
            # One image nvJPEG cannot read fails the whole call: decode this batch on the CPU.
            decoded = iter(_cpu_decode(p.numpy().tobytes()) for p in jpegs)
        return [next(decoded).to(self.device) if j else p.to(self.device, non_blocking=True)
                for p, j in zip(batch.payloads, batch.jpeg, strict=True)]

    def crops(self, batch: EncodedBatch) -> torch.Tensor:
        """uint8 NCHW crops on the device, each augmented as train.data.ImageDataset would."""
        out = []
        # The transforms draw their parameters from the CPU generator; seeding it here must not
        # change the training process's own random stream (checkpointed for exact resumes).
        with torch.random.fork_rng(devices=[]):
            for image, (epoch, index) in zip(self.decode(batch), batch.keys, strict=True):
                seed_sample(self.seed, epoch, index)
                out.append(self.preset(image))
        return torch.stack(out)

    def __call__(self, batch: EncodedBatch, labels: torch.Tensor):
        x = self.preset.normalize(self.crops(batch), channels_last=self.channels_last)
        return x, labels.to(self.device, non_blocking=True)


def _cpu_decode(data: bytes) -> torch.Tensor:
    """uint8 CHW, decoded as the worker path decodes (upright RGB)."""
    return decode(data)
