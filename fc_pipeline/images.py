"""Robust image loading: every corpus image goes through :func:`load_image`.

Whatever the file holds (CMYK, 16-bit grey, palette, alpha, EXIF rotation), the result is an
upright 8-bit RGB ``PIL.Image``; whatever is wrong with it (missing, empty, truncated, not an
image, a decompression bomb) the error is an :class:`ImageError` with a short reason code that
the dataset ledger records.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

DEFAULT_MAX_PIXELS = 64_000_000
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
ALPHA_BACKGROUND = (255, 255, 255)


class ImageError(ValueError):
    """An image that cannot be used; ``reason`` is a short code for the failure ledger.

    Codes: ``not_found``, ``empty_file``, ``unreadable``, ``truncated``, ``too_large``.
    """

    def __init__(self, reason: str, message: str):
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message


def load_image(source: str | Path | bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode ``source`` (a path or the file's bytes) into an upright 8-bit RGB image.

    The size is checked from the header before any pixel is decoded, so a decompression bomb
    costs nothing. Alpha is composited on white; 16-bit data is scaled to 8 bits.
    """
    data = _read_bytes(source)
    name = str(source) if not isinstance(source, bytes) else "<bytes>"
    with warnings.catch_warnings():
        # Our own max_pixels check replaces Pillow's global MAX_IMAGE_PIXELS warning.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError as exc:
            raise ImageError("too_large", f"{name}: {exc}") from None
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
            raise ImageError("unreadable", f"{name}: not a decodable image ({exc})") from None
        width, height = image.size
        if width <= 0 or height <= 0:
            raise ImageError("unreadable", f"{name}: image has size {width}x{height}")
        if width * height > max_pixels:
            raise ImageError("too_large", f"{name}: {width}x{height} exceeds max_pixels={max_pixels}")
        try:
            image.load()
            image = ImageOps.exif_transpose(image)
        except Image.DecompressionBombError as exc:
            raise ImageError("too_large", f"{name}: {exc}") from None
        except (OSError, SyntaxError, ValueError, EOFError) as exc:
            reason = "truncated" if "truncat" in str(exc).lower() or isinstance(exc, EOFError) else "unreadable"
            raise ImageError(reason, f"{name}: {exc}") from None
    return to_rgb(image)


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB (alpha on white, 16-bit/32-bit scaled to 8 bits)."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode.startswith("I;16") or mode in ("I", "F"):
        return Image.fromarray(_to_uint8(np.asarray(image), mode)).convert("RGB")
    if mode == "P" or mode == "PA":
        image = image.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, ALPHA_BACKGROUND + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV


def _to_uint8(array: np.ndarray, mode: str) -> np.ndarray:
    """Scale a one-channel 16/32-bit or float array to uint8."""
    array = array.astype(np.float64)
    if mode.startswith("I;16") or (mode == "I" and array.max(initial=0) > 255):
        array = np.clip(array, 0, 65535) / 257.0  # 16-bit range -> 8-bit
    elif mode == "F" and array.max(initial=0) <= 1.0:
        array = array * 255.0  # float images in [0, 1]
    return np.clip(np.rint(array), 0, 255).astype(np.uint8)


def _read_bytes(source: str | Path | bytes) -> bytes:
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
    else:
        path = Path(source)
        if not path.is_file():
            raise ImageError("not_found", f"no such file: {path}")
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ImageError("unreadable", f"{path}: {exc}") from None
    if not data:
        raise ImageError("empty_file", f"{source if not isinstance(source, bytes) else '<bytes>'} is empty")
    return data
