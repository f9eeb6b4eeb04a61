"""The train preset's random crop and flip for a whole batch of images decoded once into memory,
in one call of `crop_resize.c` (compiled like fused_norm.c, train/native.py).

Each image's draws are the preset's own (ClassificationPresetTrain.draw, seeded per sample as
every path is), and the kernel's arithmetic is torch's uint8 antialiased resize: the batch is the
same, pixel for pixel, as the preset applied image by image (tests). What changes is the time. On
2 AMX cores torch's resize of a cached 128 px crop took 0.14 ms, where a resnet18 int8-trunk step
takes 0.65 ms an image: it unpacks 3 channels into 4 and back. The kernel keeps them interleaved;
the horizontal pass takes 8 outputs at a time through byte permutations (AVX-512 VBMI) or gathers
(AVX2), the vertical pass two rows per multiply-add; the batch's images share the cores. It took
0.085 ms an image on one core, 0.046 on two. The batch comes out channels-last.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch

from . import native
from .cache import interleaved

SOURCE = Path(__file__).with_name("crop_resize.c")
_P, _I = ctypes.c_void_p, ctypes.c_int64
SIGNATURES = {"imgcls_crop_resize": ((_I, _P, _I, _P, _I, _I, _P, _P), ctypes.c_int),
              "imgcls_crop_resize_paths": ((), ctypes.c_int)}
PERMUTE, GATHER = 1, 2  # imgcls_crop_resize_paths()
KERNELS = native.Kernels(SOURCE, SIGNATURES)


def why_not(preset) -> str | None:
    """Why a train channel kept in memory is cropped image by image with `preset`; None: by batch."""
    if not getattr(preset, "crop_only", False):
        augment = getattr(preset, "augment", None)
        return ("augment=none: no random crop" if augment == "none" else
                f"augment={augment}: other random transforms follow the crop, image by image")
    if preset.interpolation != "bilinear":
        return f"interpolation={preset.interpolation}: the kernel resizes as bilinear does"
    if KERNELS.library() is None:
        return KERNELS.why_not_built()
    return None


def permutes() -> bool:
    """Whether the built kernel has the byte-permutation path (AVX-512 VBMI)."""
    lib = KERNELS.library()
    return lib is not None and bool(lib.imgcls_crop_resize_paths() & PERMUTE)


def faster_here() -> bool:
    """Whether a call on this thread's share of the cores beats torch's resize image by image:
    with its byte permutations (AVX-512 VBMI) on one thread too (0.085 against 0.150 ms an image,
    AMX, 128 px); with gathers alone (AVX2) only with the batch split among threads (0.167 on one
    thread, 0.088 on two): not in a data-loader worker, which torch runs on one thread."""
    return KERNELS.library() is not None and (permutes() or torch.get_num_threads() > 1)


def _interleaved(image: torch.Tensor) -> bool:
    return image.stride(0) == 1 and image.stride(2) == 3


def crop_resize(images: list[torch.Tensor], boxes: list[tuple[int, int, int, int]], flips: list[bool],
                size: tuple[int, int], normalize=None) -> torch.Tensor:
    """uint8 (N, 3, *size) channels-last: image i cropped to boxes[i] (top, left, height, width),
    resized as torchvision's antialiased bilinear resize does, mirrored where flips[i]. images are
    uint8 CHW over interleaved memory, as train.cache keeps them; others are copied so first.
    normalize: a preset, whose normalize(batch, channels_last=True) the batch then comes out as
    (float32, the same values), made while each image is still in the core's cache."""
    if not len(images) == len(boxes) == len(flips):
        raise ValueError(f"{len(images)} images, {len(boxes)} boxes and {len(flips)} flips: one of each per image")
    for i, im in enumerate(images):
        if im.dtype != torch.uint8 or im.dim() != 3 or im.shape[0] != 3:
            raise ValueError(f"image {i} of the batch is {im.dtype} of shape {tuple(im.shape)}: "
                             "the crop takes RGB images as uint8 (3, height, width)")
    images = [im if _interleaved(im) else interleaved(im) for im in images]
    meta = torch.tensor([[im.data_ptr(), im.shape[1], im.shape[2], im.stride(1), *box]
                         for im, box in zip(images, boxes, strict=True)], dtype=torch.int64)
    flags = torch.tensor(flips, dtype=torch.uint8)
    norm = None
    if normalize is not None:  # the preset's own fp32 constants, as its normalize computes them
        mean = torch.tensor(normalize.mean, dtype=torch.float32) * 255
        norm = torch.cat([mean, 1.0 / (torch.tensor(normalize.std, dtype=torch.float32) * 255)])
    out = torch.empty(len(images), size[0], size[1], 3, dtype=torch.uint8 if norm is None else torch.float32)
    status = KERNELS.library().imgcls_crop_resize(
        len(images), meta.data_ptr(), meta.stride(0), flags.data_ptr(), size[0], size[1],
        None if norm is None else norm.data_ptr(), out.data_ptr())
    if status < 0:
        i = -1 - status
        raise ValueError(f"crop box {tuple(boxes[i])} is not inside image {i} of the batch ({tuple(images[i].shape)})")
    if status > 0:
        raise MemoryError(f"out of memory cropping image {status - 1} of the batch")
    return out.permute(0, 3, 1, 2)
