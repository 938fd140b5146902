"""Decode image bytes into an ``(H, W, 3)`` uint8 RGB array, the one layout the
rest of the data pipeline works with.

Decoding is kept apart from *where* bytes come from
(:mod:`groundlab.data.image_source`), so folders and archives share it.

Two rules matter for detection/segmentation labels:

* **EXIF orientation is applied.** Phone photos are often stored sideways with
  an orientation tag; annotation tools (and COCO) draw boxes on the image as
  *displayed*, so pixels must be rotated the same way or boxes land on the
  wrong objects. :func:`image_size` reports the displayed size too.
  The exception: some tools ignore the tag and draw on the *stored* pixels. When
  the annotation's image size (``annotated_size``, the json's height/width) is
  the stored size and not the displayed one (orientations 5-8 of a non-square
  image, which swap its sides), the image is read as stored
  (:func:`keeps_stored_pixels`, the one rule every reader and dataset uses).
* **Every mode becomes RGB.** Grayscale, palette (with or without
  transparency), alpha, CMYK and 16/32-bit/float grayscale all end up as three
  uint8 channels. High-bit-depth images are rescaled from their actual value
  range rather than clipped (clipping a 16-bit image to 0..255 is nearly all
  white).
"""

from __future__ import annotations

import io
import warnings
from typing import Optional, Sequence

import numpy as np
from PIL import Image, ImageOps

from groundlab.errors import UserError

__all__ = ["ImageDecodeError", "decode_rgb", "image_size", "keeps_stored_pixels", "reads_as_stored"]

# Modes whose pixels are (possibly high-bit-depth) single-channel numbers.
_NUMERIC_MODES = frozenset({"I", "F", "I;16", "I;16L", "I;16B", "I;16N"})
# Modes with an alpha channel that PIL can convert to RGB directly (alpha dropped).
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})

# EXIF tag 0x0112 "Orientation"; values 5..8 involve a 90-degree turn.
_ORIENTATION_TAG = 0x0112
_TRANSPOSED_ORIENTATIONS = frozenset({5, 6, 7, 8})


class ImageDecodeError(UserError):
    """Bytes that are not a decodable image. ``name`` is the image involved."""

    def __init__(self, message: str, name: str = "<bytes>"):
        super().__init__(message)
        self.name = name


def _open(data: bytes, name: str) -> Image.Image:
    try:
        return Image.open(io.BytesIO(data))
    except Exception as e:  # UnidentifiedImageError, OSError, DecompressionBombError, ...
        raise ImageDecodeError(f"cannot decode image {name!r}: {e}", name) from e


def _numeric_to_rgb(im: Image.Image) -> np.ndarray:
    """Rescale a single-channel numeric image from its own [min, max] to 0..255.

    Returns:
        ``(H, W, 3)`` uint8.
    """
    a = np.asarray(im).astype(np.float64)
    finite = np.isfinite(a)
    if not finite.any():
        g = np.zeros(a.shape, dtype=np.uint8)
    else:
        lo, hi = float(a[finite].min()), float(a[finite].max())
        if hi > lo:
            g = (a - lo) * (255.0 / (hi - lo))
        else:
            # A constant image has no range to stretch; keep its value if it fits.
            g = np.full(a.shape, lo)
        g = np.clip(np.nan_to_num(g, nan=0.0, posinf=255.0, neginf=0.0), 0, 255)
        g = np.rint(g).astype(np.uint8)
    return np.repeat(g[:, :, None], 3, axis=2)


def _to_rgb(im: Image.Image) -> Image.Image | np.ndarray:
    mode = im.mode
    if mode == "RGB":
        return im
    if mode in _NUMERIC_MODES:
        return _numeric_to_rgb(im)
    if mode == "P":
        # A palette with a transparent index must go through RGBA, otherwise PIL
        # warns ("Palette images with Transparency expressed in bytes...").
        if "transparency" in im.info:
            return im.convert("RGBA").convert("RGB")
        return im.convert("RGB")
    if mode in _ALPHA_MODES:
        # PIL has no direct PA/La -> RGB path; go through a straight-alpha mode.
        if mode == "PA":
            return im.convert("RGBA").convert("RGB")
        if mode == "La":
            return im.convert("LA").convert("RGB")
        return im.convert("RGB")
    # "L", "1", "CMYK", "YCbCr", "LAB", "HSV", "RGBX", ...: PIL knows these.
    return im.convert("RGB")


def keeps_stored_pixels(orientation: int, stored_size: Sequence[int], annotated_size: Optional[Sequence[int]]) -> bool:
    """Whether an image is read as stored, its EXIF orientation not applied.

    True when the orientation (5-8) swaps the sides of a non-square image and ``annotated_size``
    ``(height, width)`` is the stored size: the annotations were drawn on the stored pixels, and
    rotating them would put every box on the wrong place. Otherwise (no annotated size, the displayed
    size, or neither) the orientation is applied, as annotation tools normally draw on the displayed image.
    """
    if annotated_size is None or orientation not in _TRANSPOSED_ORIENTATIONS:
        return False
    h, w = stored_size
    return h != w and (int(annotated_size[0]), int(annotated_size[1])) == (h, w)


def decode_rgb(data: bytes, name: str = "<bytes>", annotated_size: Optional[Sequence[int]] = None) -> np.ndarray:
    """Decode image bytes to RGB pixels, EXIF orientation applied (see :func:`keeps_stored_pixels`).

    Args:
        data: encoded image (JPEG, PNG, BMP, WebP, TIFF, ... anything PIL reads).
        name: used in error messages only.
        annotated_size: ``(height, width)`` the annotations were drawn on (the json's), if known.

    Returns:
        ``(H, W, 3)`` uint8, C-contiguous, writable; ``H``/``W`` as displayed, or as stored when
        the annotations say they were drawn on the stored pixels.

    Raises:
        ImageDecodeError: the bytes are not a decodable image (names ``name``).
    """
    im = _open(data, name)
    try:
        im.load()
    except Exception as e:  # truncated/corrupt pixel data surfaces here
        raise ImageDecodeError(f"cannot decode image {name!r}: {e}", name) from e
    try:
        # after load(): a PNG's eXIf chunk may follow the pixel data
        if not keeps_stored_pixels(_exif_orientation(im), (im.height, im.width), annotated_size):
            im = ImageOps.exif_transpose(im)
    except Exception as e:
        # Broken EXIF should not lose an otherwise good image; say so and go on.
        warnings.warn(f"ignoring unreadable EXIF orientation of image {name!r}: {e}", stacklevel=2)
    try:
        rgb = _to_rgb(im)
        arr = rgb if isinstance(rgb, np.ndarray) else np.asarray(rgb, dtype=np.uint8)
    except Exception as e:
        raise ImageDecodeError(f"cannot convert image {name!r} (mode {im.mode}) to RGB: {e}", name) from e
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ImageDecodeError(f"image {name!r} decoded to unexpected shape {arr.shape}", name)
    # np.asarray on a PIL image may be read-only (backed by bytes); callers
    # transform in place and torch.from_numpy warns on read-only arrays.
    if not arr.flags.c_contiguous or not arr.flags.writeable:
        arr = np.array(arr, dtype=np.uint8, order="C", copy=True)
    return arr


def _exif_orientation(im: Image.Image) -> int:
    value = im.getexif().get(_ORIENTATION_TAG, 1)
    return value if isinstance(value, int) else 1


def _orientation(im: Image.Image) -> int:
    # PIL's PNG getexif() fully decodes the image when the eXIf chunk was not in
    # the header (it may follow the pixel data); only a header eXIf is honoured
    # here. decode_rgb, which decodes everything, sees a trailing one too.
    if im.format == "PNG" and "exif" not in im.info:
        return 1
    try:
        return _exif_orientation(im)
    except Exception:
        return 1  # same leniency as decode_rgb: broken EXIF means "as stored"


def image_size(data: bytes, name: str = "<bytes>") -> tuple[int, int]:
    """``(height, width)`` as displayed (after EXIF orientation), from the header only.

    Args:
        data: encoded image bytes.
        name: used in error messages only.

    Raises:
        ImageDecodeError: the header can not be parsed (names ``name``).
    """
    im = _open(data, name)
    w, h = im.size
    if _orientation(im) in _TRANSPOSED_ORIENTATIONS:
        return w, h
    return h, w


def reads_as_stored(data: bytes, annotated_size: Optional[Sequence[int]], name: str = "<bytes>") -> bool:
    """What :func:`decode_rgb` with ``annotated_size`` will decide, from the header only.

    ``data`` may be just the file's first bytes (a JPEG's EXIF comes before its pixels); when they end
    before the header does, :class:`ImageDecodeError` says so and the caller reads the whole file.
    """
    im = _open(data, name)
    w, h = im.size
    return keeps_stored_pixels(_orientation(im), (h, w), annotated_size)
