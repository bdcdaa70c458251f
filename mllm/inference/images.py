"""Open user-supplied images, turning every way a file can be wrong into one clear `ImageError` line."""

from __future__ import annotations

import os

from PIL import Image, ImageOps, UnidentifiedImageError

from mllm.data.images import to_rgb


class ImageError(ValueError):
    """A missing, unreadable or non-image file; the message names the file and what is wrong."""


def load_image(path: str | os.PathLike) -> Image.Image:
    """Open `path` fully (not lazily, so a truncated file fails here) as upright 8-bit RGB, exactly as training does."""
    p = os.fspath(path)
    if not os.path.exists(p):
        raise ImageError(f"{p}: no such image file")
    if os.path.isdir(p):
        raise ImageError(f"{p}: is a directory, not an image file")
    try:
        with Image.open(p) as im:
            im.load()
            return to_rgb(ImageOps.exif_transpose(im))
    except UnidentifiedImageError:
        raise ImageError(f"{p}: not an image (PIL cannot identify its format)") from None
    except (OSError, SyntaxError, ValueError) as e:  # PIL raises these for truncated or corrupt files
        raise ImageError(f"{p}: unreadable image ({e})") from None


def as_image(image: Image.Image | str | os.PathLike) -> Image.Image:
    """A PIL image as upright RGB, or the image at a path."""
    return to_rgb(ImageOps.exif_transpose(image)) if isinstance(image, Image.Image) else load_image(image)
