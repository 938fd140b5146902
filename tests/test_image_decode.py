"""Tests for groundlab.data.image_decode: EXIF orientation and every mode -> RGB uint8."""

from __future__ import annotations

import io
import warnings

import numpy as np
import pytest
from PIL import Image

from groundlab.data.image_decode import ImageDecodeError, decode_rgb, image_size, keeps_stored_pixels, reads_as_stored

RED, BLUE = (255, 0, 0), (0, 0, 255)


def _save(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _check(arr: np.ndarray, h: int, w: int) -> None:
    assert arr.shape == (h, w, 3)
    assert arr.dtype == np.uint8
    assert arr.flags.c_contiguous and arr.flags.writeable


def _oriented(fmt: str, orientation: int = 6) -> bytes:
    """32 wide x 16 high, blue with a red 8x8 block at the stored top-left corner."""
    im = Image.new("RGB", (32, 16), BLUE)
    im.paste(RED, (0, 0, 8, 8))
    exif = Image.Exif()
    exif[0x0112] = orientation
    return _save(im, fmt, exif=exif.tobytes())


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_exif_orientation_6_rotates(fmt):
    arr = decode_rgb(_oriented(fmt), "rot.jpg")
    # Orientation 6 = rotate 90 degrees clockwise for display: shape swaps and
    # the stored top-left corner ends up at the top-right.
    _check(arr, 32, 16)
    top_right, top_left = arr[1, -2].astype(int), arr[1, 1].astype(int)
    assert np.abs(top_right - RED).max() < 40, top_right
    assert np.abs(top_left - BLUE).max() < 40, top_left


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_image_size_honours_exif(fmt):
    assert image_size(_oriented(fmt, 6)) == (32, 16)
    assert image_size(_oriented(fmt, 1)) == (16, 32)
    assert image_size(_oriented(fmt, 3)) == (16, 32)  # 180 degrees: no swap
    plain = _save(Image.new("RGB", (5, 3)), "PNG")
    assert image_size(plain) == (3, 5)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_annotated_at_the_stored_size_reads_as_stored(fmt):
    data = _oriented(fmt, 6)  # stored 16 high x 32 wide, displayed 32 x 16
    stored = decode_rgb(data, "rot.jpg", annotated_size=(16, 32))
    _check(stored, 16, 32)
    assert np.abs(stored[1, 1].astype(int) - RED).max() < 40  # the red block stays at the stored top-left
    assert decode_rgb(data, annotated_size=(32, 16)).shape == (32, 16, 3)  # displayed size: turned
    assert decode_rgb(data, annotated_size=(10, 10)).shape == (32, 16, 3)  # neither: turned, as without a size
    assert decode_rgb(_oriented(fmt, 3), annotated_size=(16, 32)).shape == (16, 32, 3)
    assert reads_as_stored(data, (16, 32)) and not reads_as_stored(data, (32, 16))
    assert not reads_as_stored(data, None) and not reads_as_stored(_oriented(fmt, 1), (16, 32))


def test_the_stored_pixels_rule():
    for orientation in (5, 6, 7, 8):
        assert keeps_stored_pixels(orientation, (16, 32), (16, 32))
        assert not keeps_stored_pixels(orientation, (16, 32), (32, 16))
        assert not keeps_stored_pixels(orientation, (20, 20), (20, 20))  # square: turning keeps the size
        assert not keeps_stored_pixels(orientation, (16, 32), None)
    for orientation in (1, 2, 3, 4):  # no side swap: the orientation always applies
        assert not keeps_stored_pixels(orientation, (16, 32), (16, 32))


def test_reads_as_stored_from_a_jpeg_head_only():
    big = Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 400, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 8
    data = _save(big, "JPEG", exif=exif.tobytes(), quality=95)
    assert len(data) > 4096 and reads_as_stored(data[:4096], (300, 400))
    with pytest.raises(ImageDecodeError):
        reads_as_stored(data[:100], (300, 400))  # cut inside the header: the caller reads the whole file


def test_grayscale_and_bilevel():
    arr = decode_rgb(_save(Image.new("L", (4, 3), 100), "PNG"))
    _check(arr, 3, 4)
    assert (arr == 100).all()
    bilevel = Image.new("1", (4, 3), 0)
    bilevel.putpixel((0, 0), 1)
    arr = decode_rgb(_save(bilevel, "PNG"))
    _check(arr, 3, 4)
    assert tuple(arr[0, 0]) == (255, 255, 255) and tuple(arr[2, 3]) == (0, 0, 0)


def _palette_image() -> Image.Image:
    im = Image.new("P", (4, 2), 0)
    im.putpalette([1, 2, 3, 10, 20, 30] + [0, 0, 0] * 254)
    im.putpixel((3, 1), 1)
    return im


def test_palette():
    arr = decode_rgb(_save(_palette_image(), "PNG"))
    _check(arr, 2, 4)
    assert tuple(arr[0, 0]) == (1, 2, 3) and tuple(arr[1, 3]) == (10, 20, 30)


def test_palette_with_transparency_no_warning():
    data = _save(_palette_image(), "PNG", transparency=0)
    assert "transparency" in Image.open(io.BytesIO(data)).info
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        arr = decode_rgb(data)
    _check(arr, 2, 4)
    # Alpha is dropped; the transparent entry keeps its palette colour.
    assert tuple(arr[0, 0]) == (1, 2, 3) and tuple(arr[1, 3]) == (10, 20, 30)


def test_rgba_and_la_drop_alpha():
    arr = decode_rgb(_save(Image.new("RGBA", (3, 2), (10, 20, 30, 0)), "PNG"))
    _check(arr, 2, 3)
    assert (arr == (10, 20, 30)).all()
    arr = decode_rgb(_save(Image.new("LA", (3, 2), (77, 5)), "PNG"))
    _check(arr, 2, 3)
    assert (arr == 77).all()


def test_cmyk():
    im = Image.new("CMYK", (2, 1), (0, 0, 0, 0))  # white
    im.putpixel((1, 0), (255, 0, 0, 0))  # cyan
    arr = decode_rgb(_save(im, "TIFF"))
    _check(arr, 1, 2)
    assert tuple(arr[0, 0]) == (255, 255, 255) and tuple(arr[0, 1]) == (0, 255, 255)


def test_16bit_grayscale_scales_actual_range():
    values = np.array([[1000, 2000, 3000]], dtype=np.uint16)
    data = _save(Image.fromarray(values), "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    arr = decode_rgb(data)
    _check(arr, 1, 3)
    # Clipping would give 255 everywhere; scaling maps min..max to 0..255.
    assert arr[0, :, 0].tolist() == [0, 128, 255]
    assert (arr[..., 0] == arr[..., 1]).all() and (arr[..., 1] == arr[..., 2]).all()


@pytest.mark.parametrize("dtype", [np.int32, np.float32])
def test_32bit_int_and_float(dtype):
    values = np.array([[-5, 0, 70000]], dtype=dtype)
    arr = decode_rgb(_save(Image.fromarray(values), "TIFF"))
    _check(arr, 1, 3)
    assert arr[0, 0, 0] == 0 and arr[0, 2, 0] == 255 and arr[0, 1, 0] == 0


def test_constant_16bit_image_does_not_divide_by_zero():
    arr = decode_rgb(_save(Image.fromarray(np.full((2, 2), 40, np.uint16)), "PNG"))
    _check(arr, 2, 2)
    assert (arr == 40).all()


def test_rgb_jpeg_roundtrip():
    arr = decode_rgb(_save(Image.new("RGB", (16, 8), (200, 100, 50)), "JPEG", quality=95))
    _check(arr, 8, 16)
    assert np.abs(arr.astype(int) - (200, 100, 50)).max() < 5


def test_garbage_bytes_raise_naming_image():
    with pytest.raises(ImageDecodeError, match="photos/broken.jpg") as e:
        decode_rgb(b"definitely not an image", "photos/broken.jpg")
    assert e.value.name == "photos/broken.jpg"
    with pytest.raises(ImageDecodeError, match="hdr.png"):
        image_size(b"\x00" * 32, "hdr.png")


def test_truncated_image_raises():
    data = _save(Image.effect_noise((64, 64), 50).convert("RGB"), "PNG")
    with pytest.raises(ImageDecodeError, match="cut.png"):
        decode_rgb(data[: len(data) // 2], "cut.png")
