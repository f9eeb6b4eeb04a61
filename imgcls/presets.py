"""Preprocessing presets, defined once and imported by the trainer and the server.

Each preset turns an RGB image into a uint8 CHW tensor of a fixed size; normalization to
float happens on the whole batch (`normalize`), on the device that runs the model, so data
loader workers and request decoding move 4x fewer bytes. The eval preset is stored in the
artifact (`to_dict`) and rebuilt by the server (`from_dict`): serving preprocesses exactly
as the trainer evaluated.

`decode_size`: a JPEG whose both sides are at least this large is decoded at a reduced scale
(libjpeg's DCT scaling, 1/2 to 1/8) that still leaves both sides at least this large, twice the
resize size: a 12-megapixel photo then decodes in a fraction of the time, and the resize that
follows sees more than enough pixels. Trainer and server both decode this way.
"""

from __future__ import annotations

import math

import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2 as T
from torchvision.transforms.v2 import functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
AUGMENT_LEVELS = ("none", "light", "medium", "heavy")
# Eval resizes the shorter side to crop / 0.875 then center-crops, as torchvision's weights expect.
CROP_RATIO = 0.875


def _as_uint8_tensor(img: Image.Image | torch.Tensor) -> torch.Tensor:
    return img if isinstance(img, torch.Tensor) else F.pil_to_tensor(img)


class _Preset:
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    transforms: T.Compose
    decode_size: int | None = None

    def __call__(self, img: Image.Image | torch.Tensor) -> torch.Tensor:
        return self.transforms(_as_uint8_tensor(img))

    def normalize(self, batch: torch.Tensor, dtype: torch.dtype = torch.float32,
                  channels_last: bool = False) -> torch.Tensor:
        """uint8 NCHW batch -> normalized float batch (on batch's device)."""
        mean = torch.tensor(self.mean, device=batch.device, dtype=torch.float32).view(1, 3, 1, 1) * 255
        inv_std = 1.0 / (torch.tensor(self.std, device=batch.device, dtype=torch.float32).view(1, 3, 1, 1) * 255)
        # In place, and the layout changed after the cast (half the bytes for bf16): the same values
        # in 0.6 of the time on 2 cores, where a step of a frozen resnet18 trunk in int8 takes
        # about 20 ms a batch and this took 2.5-4.
        out = batch.to(torch.float32, copy=True).sub_(mean).mul_(inv_std).to(dtype)
        if channels_last:
            out = out.contiguous(memory_format=torch.channels_last)
        return out


class ClassificationPresetEval(_Preset):
    def __init__(self, crop_size: int, resize_size: int | None = None, mean=IMAGENET_MEAN,
                 std=IMAGENET_STD, interpolation: str = "bilinear", decode_size: int | None = -1):
        self.crop_size = int(crop_size)
        self.resize_size = int(resize_size or round(crop_size / CROP_RATIO))
        # -1: the default rule; None: full decoding (artifacts written before decode_size existed)
        self.decode_size = 2 * self.resize_size if decode_size == -1 else decode_size
        self.mean, self.std = tuple(mean), tuple(std)
        self.interpolation = interpolation
        self.transforms = T.Compose([
            T.Resize(self.resize_size, interpolation=InterpolationMode(interpolation), antialias=True),
            T.CenterCrop(self.crop_size),
        ])

    def to_dict(self) -> dict:
        return {"name": "ClassificationPresetEval", "crop_size": self.crop_size,
                "resize_size": self.resize_size, "mean": list(self.mean), "std": list(self.std),
                "interpolation": self.interpolation, "decode_size": self.decode_size}

    @classmethod
    def from_dict(cls, d: dict) -> ClassificationPresetEval:
        return cls(crop_size=d["crop_size"], resize_size=d["resize_size"], mean=d["mean"],
                   std=d["std"], interpolation=d.get("interpolation", "bilinear"),
                   decode_size=d.get("decode_size"))


class ClassificationPresetTrain(_Preset):
    def __init__(self, crop_size: int, augment: str = "light", mean=IMAGENET_MEAN, std=IMAGENET_STD,
                 interpolation: str = "bilinear"):
        if augment not in AUGMENT_LEVELS:
            raise ValueError(f"augment must be one of {AUGMENT_LEVELS}, got {augment!r}")
        self.mean, self.std = tuple(mean), tuple(std)
        self.crop_size, self.augment, self.interpolation = int(crop_size), augment, interpolation
        self.decode_size = 2 * round(crop_size / CROP_RATIO)
        interp = InterpolationMode(interpolation)
        self._crop = None
        if augment == "none":
            self.transforms = ClassificationPresetEval(crop_size, mean=mean, std=std,
                                                       interpolation=interpolation).transforms
            return
        scale = (0.25, 1.0) if augment == "light" else (0.08, 1.0)
        self._crop = T.RandomResizedCrop(crop_size, scale=scale, interpolation=interp, antialias=True)
        self._log_ratio = (math.log(self._crop.ratio[0]), math.log(self._crop.ratio[1]))
        rest = []
        if augment in ("medium", "heavy"):
            rest.append(T.TrivialAugmentWide(interpolation=interp))
        if augment == "heavy":
            rest.append(T.RandomErasing(p=0.25))
        self._rest = T.Compose(rest) if rest else None
        self.transforms = T.Compose([self._crop, T.RandomHorizontalFlip(), *rest])

    @property
    def crop_only(self) -> bool:
        """Whether the random crop and flip are all the preset does (augment=light): what a whole
        batch can get in one call (train.batch_crop)."""
        return self._crop is not None and self._rest is None

    def draw(self, height: int, width: int) -> tuple[tuple[int, int, int, int], bool]:
        """((top, left, height, width) of the random crop, whether to flip) for an image of that
        size, from torch's generator: RandomResizedCrop's draws in its order, then
        RandomHorizontalFlip's. The same boxes as RandomResizedCrop.make_params for the same state
        (tests), at half its time: it dispatches on the inputs' types first."""
        crop = self._crop
        area = height * width
        for _ in range(10):
            target = area * torch.empty(1).uniform_(crop.scale[0], crop.scale[1]).item()
            aspect = math.exp(torch.empty(1).uniform_(self._log_ratio[0], self._log_ratio[1]).item())
            w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
            if 0 < w <= width and 0 < h <= height:
                top = torch.randint(0, height - h + 1, size=(1,)).item()
                box = (top, torch.randint(0, width - w + 1, size=(1,)).item(), h, w)
                break
        else:  # ten misses: the largest centred box within the ratio range
            ratio = width / height
            if ratio < min(crop.ratio):
                w, h = width, round(width / min(crop.ratio))
            elif ratio > max(crop.ratio):
                w, h = round(height * max(crop.ratio)), height
            else:
                w, h = width, height
            box = ((height - h) // 2, (width - w) // 2, h, w)
        return box, bool(torch.rand(1) < 0.5)  # RandomHorizontalFlip(p=0.5) flips unless its draw is >= p

    def __call__(self, img: Image.Image | torch.Tensor) -> torch.Tensor:
        """What `transforms` gives for the same state of torch's generator (the same draws in the same
        order, the same kernels), without v2's dispatch of each transform: the random crop and flip of
        an image decoded once in memory, which a CPU job runs in its training process, took 0.195 ms
        an image through the loader instead of 0.224 at 128 px (docs/benchmarks.md)."""
        if self._crop is None:  # augment="none": the eval transforms
            return super().__call__(img)
        img = _as_uint8_tensor(img)
        (top, left, h, w), flip = self.draw(*img.shape[-2:])
        out = F.resize_image(F.crop_image(img, top, left, h, w), list(self._crop.size),
                             interpolation=self._crop.interpolation, antialias=self._crop.antialias)
        if flip:
            out = F.horizontal_flip_image(out)
        return self._rest(out) if self._rest is not None else out
