"""Decode any image file the way training and serving both expect: 8-bit RGB, upright.

Grayscale, palette, RGBA, CMYK and 16-bit images are converted here and only here, so a
photo looks the same to the model at training time and at serving time.

`decode` gives the uint8 tensor the presets take. A plain JPEG (what cameras and most datasets
hold) goes to libjpeg-turbo through torchvision.io, which skips Pillow's image object and its
copy into a tensor: the same pixels, as tests check, and 1.4-1.5x the images a second on one
core, 500 x 375 photos (docs/benchmarks.md). Everything else goes through Pillow.
"""

from __future__ import annotations

import contextlib
import io
import os
import warnings

import numpy as np
import torch
from PIL import ExifTags, Image, ImageFile, ImageOps, UnidentifiedImageError
from torchvision.transforms.v2.functional import pil_to_tensor

from .errors import ImageDecodeError, ImageTooLargeError

try:  # deprecated in torchvision 0.29 for TorchCodec's decoders; without it Pillow decodes everything
    from torchvision.io import ImageReadMode, decode_jpeg
except ImportError:
    decode_jpeg = None

# A truncated file is a broken file: never pad it with grey silently.
ImageFile.LOAD_TRUNCATED_IMAGES = False

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp"})

DEFAULT_MAX_PIXELS = 64_000_000


def is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _scale_high_bit_depth(img: Image.Image) -> Image.Image:
    """16/32-bit integer and float grayscale to 8-bit by range, not by clipping."""
    arr = np.asarray(img)
    if img.mode == "F":
        lo, hi = float(np.nanmin(arr)), float(np.nanmax(arr))
        scaled = (arr - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(arr)
    else:
        # PNG 16-bit grayscale arrives as I;16 or as I holding 0..65535.
        scaled = arr.astype(np.float64) / 257.0
    return Image.fromarray(np.clip(scaled, 0, 255).round().astype(np.uint8), mode="L")


def to_rgb(img: Image.Image) -> Image.Image:
    """Apply EXIF orientation and convert any mode to RGB (transparency onto white)."""
    img = ImageOps.exif_transpose(img)
    if img.mode == "RGB":
        return img
    if img.mode.startswith("I") or img.mode == "F":
        img = _scale_high_bit_depth(img)
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def open_image(source: str | os.PathLike | bytes, max_pixels: int = DEFAULT_MAX_PIXELS,
               draft_size: int | None = None) -> Image.Image:
    """Fully decode `source` (path or bytes) into an upright RGB image.

    draft_size lets JPEG decode at a reduced scale when only a small image is needed
    (validation scans): libjpeg still reads the whole stream, so truncation is still seen.
    Raises ImageDecodeError or ImageTooLargeError with a message naming the problem.
    """
    where = "" if isinstance(source, bytes) else f" {os.fspath(source)}"
    if isinstance(source, bytes):
        if not source:
            raise ImageDecodeError("The image is empty (0 bytes): send the file's contents.")
        fp = io.BytesIO(source)
    else:
        if os.path.getsize(source) == 0:
            raise ImageDecodeError(f"The file{where} is empty (0 bytes).")
        fp = source
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(fp)
            width, height = img.size
            if width * height > max_pixels:
                raise ImageTooLargeError(
                    f"The image{where} has {width}x{height} pixels, over the limit of {max_pixels}: "
                    "resize it before sending it."
                )
            if draft_size and img.format == "JPEG":
                img.draft("RGB", (draft_size, draft_size))
            img.load()
            return to_rgb(img)
    except (ImageTooLargeError, ImageDecodeError):
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageTooLargeError(f"The image{where} is too large to decode safely: {exc}") from None
    except UnidentifiedImageError:
        raise ImageDecodeError(
            f"The {'data' if isinstance(source, bytes) else 'file'}{where} is not an image Pillow can read (expected JPEG, PNG, BMP or WebP)."
        ) from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageDecodeError(f"The image{where} is corrupt or truncated: {exc}") from None


def image_from_array(array: np.ndarray, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """An HWC (or HW) uint8 array, as a client sends it, to an RGB image like `open_image` returns.

    1 channel is grayscale, 3 RGB, 4 RGBA (composited onto white as in training).
    """
    if array.dtype != np.uint8:
        raise ImageDecodeError(f"The array has dtype {array.dtype}; send uint8 pixel values 0..255 "
                               "(for example np.asarray(PIL.Image.open(f).convert('RGB'))).")
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (3, 4)):
        raise ImageDecodeError(f"The array has shape {tuple(array.shape)}; send one image as HxWx3 "
                               "(or HxW, HxWx1, HxWx4) or a batch as NxHxWx3.")
    height, width = array.shape[:2]
    if height == 0 or width == 0:
        raise ImageDecodeError(f"The array has shape {tuple(array.shape)}: an image needs at least one pixel.")
    if width * height > max_pixels:
        raise ImageTooLargeError(f"The image has {width}x{height} pixels, over the limit of {max_pixels}: "
                                 "resize it before sending it.")
    mode = {2: "L", 3: "RGB", 4: "RGBA"}[array.ndim if array.ndim == 2 else array.shape[2]]
    return to_rgb(Image.fromarray(np.ascontiguousarray(array), mode=mode))


_JPEG_START = b"\xff\xd8\xff"
_TRANSPOSING = range(2, 9)  # EXIF orientations that exif_transpose turns upright


def _plain_jpeg(source: str | os.PathLike | bytes, max_pixels: int, draft_size: int | None) -> torch.Tensor | None:
    """source's bytes as a uint8 tensor where libjpeg-turbo's RGB output is open_image's to the
    pixel: a JPEG in YCbCr or grayscale, within the pixel limits, upright (no EXIF orientation to
    apply) and not reduced by draft_size (libjpeg's DCT scaling, which only Pillow asks for); else
    None."""
    if decode_jpeg is None:
        return None
    if isinstance(source, (bytes, bytearray, memoryview)):
        if bytes(source[:3]) != _JPEG_START:
            return None
        data = bytearray(source)
    else:
        try:
            with open(source, "rb") as f:
                if f.read(3) != _JPEG_START:
                    return None
                data = bytearray(_JPEG_START + f.read())
        except OSError:  # open_image raises what it always has
            return None
    try:
        with Image.open(io.BytesIO(data)) as img:  # the header only
            width, height = img.size
            if (img.format != "JPEG" or img.mode not in ("RGB", "L")
                    or width * height > min(max_pixels, Image.MAX_IMAGE_PIXELS or max_pixels)
                    or img.getexif().get(ExifTags.Base.Orientation, 1) in _TRANSPOSING
                    or (draft_size and min(width // draft_size, height // draft_size) >= 2)):
                return None
    except Exception:  # open_image reads it again and says what is wrong
        return None
    return torch.frombuffer(data, dtype=torch.uint8)


def decode(source: str | os.PathLike | bytes, max_pixels: int = DEFAULT_MAX_PIXELS,
           draft_size: int | None = None) -> torch.Tensor:
    """uint8 (3, height, width) over interleaved memory: pil_to_tensor(open_image(...)) of the same
    arguments, pixel for pixel, and its errors."""
    data = _plain_jpeg(source, max_pixels, draft_size)
    if data is not None:
        with contextlib.suppress(RuntimeError):  # a broken stream: open_image names the problem
            return decode_jpeg(data, mode=ImageReadMode.RGB)
    return pil_to_tensor(open_image(source, max_pixels, draft_size))
