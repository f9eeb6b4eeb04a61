import io

import numpy as np
import pytest
import torch
from PIL import Image

from imgcls import images
from imgcls.errors import ImageDecodeError, ImageTooLargeError
from imgcls.images import decode, open_image


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def test_grayscale_palette_cmyk_become_rgb():
    for img in (Image.new("L", (8, 6), 128), Image.new("RGB", (8, 6), (200, 10, 10)).convert("P"),
                Image.new("CMYK", (8, 6), (0, 255, 255, 0)), Image.new("1", (8, 6), 1)):
        fmt = "JPEG" if img.mode == "CMYK" else "PNG"
        out = open_image(encode(img, fmt))
        assert out.mode == "RGB" and out.size == (8, 6)


def test_cmyk_red_stays_red():
    out = np.asarray(open_image(encode(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "JPEG")))
    r, g, b = out[4, 4].astype(int)
    assert r > 200 and g < 60 and b < 60


def test_rgba_transparent_pixels_become_white():
    img = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    img.putpixel((0, 0), (0, 0, 255, 255))
    out = np.asarray(open_image(encode(img, "PNG")))
    assert tuple(out[3, 3]) == (255, 255, 255)
    assert tuple(out[0, 0]) == (0, 0, 255)


def test_16_bit_grayscale_scaled_not_clipped():
    arr = np.full((4, 4), 32896, dtype=np.uint16)  # half of 65535 (plus rounding)
    img = Image.fromarray(arr)
    out = np.asarray(open_image(encode(img, "PNG")))
    assert 126 <= int(out[0, 0, 0]) <= 129


def test_exif_orientation_is_applied():
    img = Image.new("RGB", (20, 10), (0, 255, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 on display
    out = open_image(encode(img, "JPEG", exif=exif.tobytes()))
    assert out.size == (10, 20)


@pytest.mark.parametrize("data,fragment", [
    (b"", "empty"),
    (b"this is not an image at all", "not an image"),
])
def test_undecodable_bytes(data, fragment):
    with pytest.raises(ImageDecodeError, match=fragment):
        open_image(data)


def test_truncated_jpeg_is_an_error():
    data = encode(Image.effect_noise((64, 64), 50).convert("RGB"), "JPEG", quality=95)
    with pytest.raises(ImageDecodeError, match="corrupt or truncated"):
        open_image(data[: len(data) // 2])


def test_pixel_limit():
    with pytest.raises(ImageTooLargeError, match="over the limit"):
        open_image(encode(Image.new("RGB", (100, 100)), "PNG"), max_pixels=5000)


def test_large_jpegs_decode_at_a_reduced_scale_with_the_same_result():
    """decode_size: a 1600x1200 photo decodes at 1/2 scale (DCT scaling) for a 224 crop; the crop stays
    within a level or two of full decoding, and the preset records the rule for the server."""
    from bench.images import photo_like_jpegs
    from imgcls.images import open_image
    from imgcls.presets import ClassificationPresetEval

    preset = ClassificationPresetEval(224)
    assert preset.decode_size == 512
    jpeg = photo_like_jpegs(1, size=(1600, 1200), seed=4)[0]
    assert open_image(jpeg, draft_size=preset.decode_size).size == (800, 600)
    full = preset(open_image(jpeg)).int()
    drafted = preset(open_image(jpeg, draft_size=preset.decode_size)).int()
    assert full.shape == drafted.shape == (3, 224, 224)
    assert (full - drafted).abs().float().mean() < 2.5
    assert ClassificationPresetEval.from_dict(preset.to_dict()).decode_size == 512
    legacy = {k: v for k, v in preset.to_dict().items() if k != "decode_size"}  # artifacts before decode_size
    assert ClassificationPresetEval.from_dict(legacy).decode_size is None


def _photo(size, seed=0, mode="RGB") -> Image.Image:
    """Edges and gradients at every scale, so that subsampling, IDCT and upsampling all show."""
    rng = np.random.default_rng(seed)
    small = Image.fromarray(rng.integers(0, 255, (max(1, size[1] // 7), max(1, size[0] // 7), 3), dtype=np.uint8))
    return small.resize(size, Image.BICUBIC).convert(mode)


def _orientation(value: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = value
    return exif.tobytes()


# (name, the encoded image, whether libjpeg-turbo through torchvision decodes it: the fast path)
DECODE_CASES = [
    ("4:2:0", encode(_photo((501, 377)), "JPEG", quality=90), True),
    ("4:4:4", encode(_photo((64, 48), 1), "JPEG", quality=75, subsampling=0), True),
    ("4:2:2", encode(_photo((65, 47), 2), "JPEG", quality=85, subsampling=1), True),
    ("progressive", encode(_photo((120, 90), 3), "JPEG", quality=85, progressive=True), True),
    ("optimized", encode(_photo((120, 90), 4), "JPEG", quality=95, optimize=True), True),
    ("restart markers", encode(_photo((130, 70), 5), "JPEG", restart_marker_blocks=3), True),
    ("grayscale", encode(_photo((90, 60), 6, "L"), "JPEG"), True),
    ("1x1", encode(_photo((1, 1), 7), "JPEG"), True),
    ("17x3", encode(_photo((17, 3), 8), "JPEG"), True),
    ("orientation 1", encode(_photo((40, 30), 9), "JPEG", exif=_orientation(1)), True),
    ("orientation 6", encode(_photo((40, 30), 9), "JPEG", exif=_orientation(6)), False),
    ("CMYK", encode(_photo((40, 30), 10, "CMYK"), "JPEG"), False),
    ("PNG", encode(_photo((40, 30), 11), "PNG"), False),
]


@pytest.mark.parametrize("name,data,fast", DECODE_CASES, ids=[c[0] for c in DECODE_CASES])
def test_decode_is_open_image_to_the_pixel(name, data, fast, tmp_path):
    """decode is what the presets see in training and serving: pil_to_tensor(open_image), from bytes
    and from a file, whichever decoder it takes; and plain JPEGs take the fast one."""
    from torchvision.transforms.v2.functional import pil_to_tensor

    path = tmp_path / "image"
    path.write_bytes(data)
    reference = pil_to_tensor(open_image(data))
    for source in (data, path, str(path)):
        out = decode(source)
        assert out.dtype == torch.uint8 and out.stride()[0] == 1, "interleaved, as pil_to_tensor gives it"
        assert torch.equal(out, reference), name
    assert (images._plain_jpeg(data, images.DEFAULT_MAX_PIXELS, None) is not None) == fast


@pytest.mark.parametrize("size", [(1023, 1100), (1024, 1100), (1100, 1024), (2048, 1500)])
def test_decode_leaves_the_reduced_scale_to_pillow(size):
    """Where draft_size lets libjpeg decode at 1/2 or less (both sides at least twice it), Pillow
    decodes: torchvision.io has no DCT scaling. Just below, the fast path gives full-scale pixels."""
    from torchvision.transforms.v2.functional import pil_to_tensor

    data = encode(_photo(size, 12), "JPEG", quality=80)
    out = decode(data, draft_size=512)
    assert torch.equal(out, pil_to_tensor(open_image(data, draft_size=512)))
    reduced = min(size) >= 1024
    assert out.shape[1:] == ((size[1] // 2, size[0] // 2) if reduced else (size[1], size[0]))
    assert (images._plain_jpeg(data, images.DEFAULT_MAX_PIXELS, 512) is None) == reduced


@pytest.mark.parametrize("data,error,fragment", [
    (b"", ImageDecodeError, "empty"),
    (b"\xff\xd8\xffnot a jpeg after its first bytes", ImageDecodeError, "not an image"),
    (DECODE_CASES[0][1][: len(DECODE_CASES[0][1]) // 2], ImageDecodeError, "corrupt or truncated"),
    (DECODE_CASES[0][1][:300], ImageDecodeError, "corrupt or truncated"),
    (DECODE_CASES[0][1], ImageTooLargeError, "over the limit"),
])
def test_decode_errors_are_open_images(data, error, fragment):
    """A file the fast path cannot take gets open_image's error, not torchvision's (and a truncated
    JPEG is never padded with grey)."""
    kwargs = {"max_pixels": 1000} if error is ImageTooLargeError else {}
    with pytest.raises(error, match=fragment):
        decode(data, **kwargs)


def test_decode_without_torchvision_decoders(monkeypatch):
    """torchvision deprecates its decoders (0.29): without them Pillow decodes everything."""
    data = DECODE_CASES[0][1]
    fast = decode(data)
    monkeypatch.setattr(images, "decode_jpeg", None)
    assert images._plain_jpeg(data, images.DEFAULT_MAX_PIXELS, None) is None
    assert torch.equal(decode(data), fast)


@pytest.mark.parametrize("augment", ["light", "medium", "heavy"])
def test_train_preset_gives_what_its_transforms_give_for_the_same_draws(augment):
    """The preset's own crop-and-flip path: same output, layout and generator draws as its v2 Compose,
    for planar and interleaved (cached) memory, PIL input, and images too small or too narrow for any
    random box (the central fallback)."""
    import torch

    from imgcls.presets import ClassificationPresetTrain
    from train.cache import interleaved

    preset = ClassificationPresetTrain(32, augment)
    g = torch.Generator().manual_seed(1)
    planar = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g)
              for h, w in ((75, 100), (100, 60), (33, 32), (8, 120), (300, 9))]
    images = planar + [interleaved(x) for x in planar]
    images.append(Image.fromarray(planar[0].permute(1, 2, 0).numpy()))
    flipped = cropped = 0
    for image in images:
        for seed in range(12):
            torch.manual_seed(seed)
            fast, after_fast = preset(image), torch.rand(1)
            torch.manual_seed(seed)
            tensor = image if isinstance(image, torch.Tensor) else torch.from_numpy(np.array(image)).permute(2, 0, 1)
            slow, after_slow = preset.transforms(tensor), torch.rand(1)
            assert fast.shape == (3, 32, 32) and torch.equal(fast, slow) and fast.stride() == slow.stride()
            assert torch.equal(after_fast, after_slow)  # as many draws: the next sample's are the same too
            torch.manual_seed(seed)
            box = preset._crop.make_params([tensor])
            flipped += torch.rand(1).item() < 0.5
            cropped += (box["height"], box["width"]) != tuple(tensor.shape[-2:])
    assert 0 < flipped < len(images) * 12 and cropped > 0  # both branches ran
