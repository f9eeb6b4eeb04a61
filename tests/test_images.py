import io

import numpy as np
import pytest
from PIL import Image

from imgcls.errors import ImageDecodeError, ImageTooLargeError
from imgcls.images import open_image


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
