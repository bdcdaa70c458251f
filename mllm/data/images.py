"""Opening images safely: paths stay inside the image root, sizes are checked before decoding, EXIF is applied."""

from __future__ import annotations

import contextlib
import io
import os
import warnings
from collections.abc import Iterator

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from mllm.data.errors import BadSampleError
from mllm.data.sample import ImageRef


def resolve_image_path(root: str, ref: str) -> str:
    """`ref` joined to `root`, refusing anything that would leave the root (`..`, outside absolute paths, symlinks)."""
    if not ref or "\0" in ref:
        raise BadSampleError("bad_image_path", f"invalid image path {ref!r}")
    parts = ref.replace("\\", "/").split("/")
    if ".." in parts:
        raise BadSampleError(
            "unsafe_image_path", f"image path {ref!r} contains '..'; paths must stay inside image_root"
        )
    real_root = os.path.realpath(root)
    path = os.path.realpath(
        os.path.join(real_root, ref)
    )  # an absolute ref replaces the root here, then is checked
    if os.path.commonpath([real_root, path]) != real_root:
        raise BadSampleError(
            "unsafe_image_path", f"image path {ref!r} resolves to {path}, outside image_root {real_root}"
        )
    return path


def open_image(ref: ImageRef, root: str, max_pixels: int) -> Image.Image:
    """An RGB image, upright per its EXIF orientation. Missing, unreadable or oversized → BadSampleError."""
    if isinstance(ref, Image.Image):
        return _finish(ref, max_pixels, "in-memory image")
    if isinstance(ref, (bytes, bytearray)):
        return _decode(io.BytesIO(ref), max_pixels, "image bytes")
    if not isinstance(ref, str):
        raise BadSampleError("bad_image_path", f"expected an image path or bytes, got {type(ref).__name__}")
    path = resolve_image_path(root, ref)
    if not os.path.isfile(path):
        raise BadSampleError("missing_image", f"image {ref!r} not found (looked for {path})")
    return _decode(path, max_pixels, ref)


_SWAPS_SIDES = (5, 6, 7, 8)
"""EXIF orientations that turn the image a quarter: its upright width is the stored height."""


def image_size(ref: ImageRef, root: str, max_pixels: int) -> tuple[int, int]:
    """The upright (width, height) of an image from its header alone (PIL opens lazily: no pixels decoded)."""
    if isinstance(ref, Image.Image):
        return ref.size[::-1] if _orientation(ref) in _SWAPS_SIDES else ref.size
    if isinstance(ref, (bytes, bytearray)):
        fp, what = io.BytesIO(ref), "image bytes"
    elif isinstance(ref, str):
        fp, what = resolve_image_path(root, ref), ref
        if not os.path.isfile(fp):
            raise BadSampleError("missing_image", f"image {ref!r} not found (looked for {fp})")
    else:
        raise BadSampleError("bad_image_path", f"expected an image path or bytes, got {type(ref).__name__}")
    with _decoding(what), Image.open(fp) as img:
        _check_size(img, max_pixels, what)
        w, h = img.size
        return (h, w) if _orientation(img) in _SWAPS_SIDES else (w, h)


def _orientation(img: Image.Image) -> int:
    """The EXIF orientation tag, read from the header: a PNG's `getexif` would decode the file to look for a late
    eXIf chunk, so for PNG only an eXIf chunk before the pixels counts (where writers put it)."""
    if img.format == "PNG":
        raw = img.info.get("exif")
        if not raw:
            return 1
        exif = Image.Exif()
        exif.load(raw)
        return exif.get(0x0112, 1)
    return img.getexif().get(0x0112, 1)


@contextlib.contextmanager
def _decoding(what: str) -> Iterator[None]:
    """Reading an image file: PIL's own size warnings off (we enforce our own limit, `_check_size`), and its
    errors turned into BadSampleError naming `what` (oversized, or unreadable with PIL's reason)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            yield
    except Image.DecompressionBombError as e:
        raise BadSampleError("oversized_image", f"{what}: {e}") from None
    except BadSampleError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise BadSampleError("unreadable_image", f"{what}: cannot decode ({type(e).__name__}: {e})") from None


def _decode(fp, max_pixels: int, what: str) -> Image.Image:
    with _decoding(what):
        img = Image.open(fp)
        _check_size(img, max_pixels, what)
        img.load()
        return _finish(img, max_pixels, what)  # EXIF and mode conversion read the file too: same guard


def _check_size(img: Image.Image, max_pixels: int, what: str) -> None:
    w, h = img.size
    if w * h > max_pixels:
        raise BadSampleError(
            "oversized_image", f"{what}: {w}x{h} = {w * h} pixels exceeds max_image_pixels={max_pixels}"
        )


def _finish(img: Image.Image, max_pixels: int, what: str) -> Image.Image:
    _check_size(img, max_pixels, what)
    return to_rgb(ImageOps.exif_transpose(img))


SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
"""Integer grey modes; PIL opens 16-bit grey PNG/TIFF in these (`I` is taken to hold 16-bit values too)."""


def to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB as a viewer shows the image: 16-bit samples scaled down, transparency composited on white.

    PIL's own `convert("RGB")` clips 16-bit values (most of the range turns white) and drops alpha (transparent
    areas show whatever colour they store, often black); the white background follows transformers'
    `convert_to_rgb`.
    """
    if img.mode == "RGB":
        return img
    if img.mode in SIXTEEN_BIT_MODES:
        grey = np.asarray(img).astype(np.int64) >> 8
        img = Image.fromarray(grey.clip(0, 255).astype(np.uint8), mode="L")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")
