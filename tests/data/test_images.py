"""load_image: every odd file becomes upright RGB or an ImageError with a reason code."""

import io

import numpy as np
import pytest
from PIL import Image

from fc_pipeline.images import ImageError, load_image


def _encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def test_rgb_jpeg_path_and_bytes(tmp_path):
    path = tmp_path / "a.jpg"
    Image.new("RGB", (40, 30), (200, 10, 10)).save(path, quality=95)
    for source in (path, str(path), path.read_bytes()):
        image = load_image(source)
        assert image.mode == "RGB" and image.size == (40, 30)
        r, g, b = image.getpixel((20, 15))
        assert r > 180 and g < 40 and b < 40


def test_cmyk_jpeg_becomes_rgb():
    data = _encode(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG", quality=95)  # pure red in CMYK
    image = load_image(data)
    assert image.mode == "RGB"
    r, g, b = image.getpixel((8, 8))
    assert r > 200 and g < 60 and b < 60


def test_16bit_grey_png_scaled_to_8bit():
    array = np.full((8, 8), 65535, dtype=np.uint16)
    array[:, :4] = 257 * 100
    image = load_image(_encode(Image.fromarray(array), "PNG"))
    assert image.mode == "RGB"
    assert image.getpixel((6, 0)) == (255, 255, 255)
    assert image.getpixel((1, 0)) == (100, 100, 100)


def test_rgba_and_la_composited_on_white():
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    rgba.putpixel((0, 0), (255, 0, 0, 255))
    image = load_image(_encode(rgba, "PNG"))
    assert image.getpixel((0, 0)) == (255, 0, 0)
    assert image.getpixel((3, 3)) == (255, 255, 255)
    la = load_image(_encode(Image.new("LA", (4, 4), (0, 128)), "PNG"))
    assert la.getpixel((0, 0)) == (127, 127, 127)  # black at alpha 128/255 over white


def test_palette_with_transparency():
    palette = Image.new("P", (4, 4), 1)
    palette.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    palette.putpixel((0, 0), 0)
    image = load_image(_encode(palette, "PNG", transparency=0))
    assert image.getpixel((0, 0)) == (255, 255, 255)
    assert image.getpixel((2, 2)) == (0, 255, 0)


def test_exif_orientation_is_applied():
    source = Image.new("RGB", (60, 20), (0, 0, 255))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    image = load_image(_encode(source, "JPEG", exif=exif.tobytes()))
    assert image.size == (20, 60)


@pytest.mark.parametrize(
    "payload, reason",
    [
        (b"", "empty_file"),
        (b"this is not an image at all", "unreadable"),
    ],
)
def test_bad_bytes(payload, reason):
    with pytest.raises(ImageError) as info:
        load_image(payload)
    assert info.value.reason == reason
    assert isinstance(info.value, ValueError)


def test_missing_file(tmp_path):
    with pytest.raises(ImageError) as info:
        load_image(tmp_path / "nope.png")
    assert info.value.reason == "not_found"


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_file(fmt):
    rng = np.random.default_rng(0)
    data = _encode(Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)), fmt)
    with pytest.raises(ImageError) as info:
        load_image(data[: len(data) // 2])
    assert info.value.reason == "truncated"


def test_decompression_bomb_rejected_from_header():
    data = _encode(Image.new("L", (5000, 5000)), "PNG")  # tiny file, 25 MP
    assert len(data) < 100_000
    with pytest.raises(ImageError) as info:
        load_image(data, max_pixels=1_000_000)
    assert info.value.reason == "too_large"
    assert load_image(data).size == (5000, 5000)
