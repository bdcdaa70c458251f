"""Image files that are unusual but valid (CMYK, 16-bit, palette, alpha, EXIF-rotated) or hostile (truncated,
empty, lying about their size), each with the RGB pixels a correct loader must produce from it."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

QUADRANTS = ((230, 30, 30), (30, 200, 30), (30, 30, 230), (240, 240, 40))
"""Upright reference image: top-left red, top-right green, bottom-left blue, bottom-right yellow."""


def quadrants(width: int = 64, height: int = 32) -> np.ndarray:
    """The upright reference picture as an RGB array. Quadrant edges fall on JPEG block edges (multiples of 8)
    and the JPEGs are saved without chroma subsampling, so lossy files keep every pixel within a few levels."""
    a = np.zeros((height, width, 3), dtype=np.uint8)
    h, w = height // 2, width // 2
    a[:h, :w], a[:h, w:], a[h:, :w], a[h:, w:] = QUADRANTS
    return a


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bytes(width: int, height: int, bit_depth: int, color_type: int, rows: bytes) -> bytes:
    """A PNG written by hand, so that its header may say anything (PIL cannot write 16-bit RGB or lie)."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", zlib.compress(rows))
        + _png_chunk(b"IEND", b"")
    )


def exif_rotated(path: Path, orientation: int) -> np.ndarray:
    """Store `quadrants()` turned so that a viewer applying EXIF `orientation` shows it upright; JPEG."""
    upright = Image.fromarray(quadrants())
    stored = {
        3: upright.transpose(Image.Transpose.ROTATE_180),
        6: upright.transpose(Image.Transpose.ROTATE_90),  # 6 = "rotate 90° clockwise to display"
        8: upright.transpose(Image.Transpose.ROTATE_270),
        2: upright.transpose(Image.Transpose.FLIP_LEFT_RIGHT),
    }[orientation]
    exif = stored.getexif()
    exif[0x0112] = orientation
    stored.save(path, quality=95, subsampling=0, exif=exif)
    return quadrants()


def write_valid(root: Path) -> dict[str, tuple[np.ndarray, int]]:
    """Unusual but valid images in `root`: file name → (the RGB pixels they must load as, tolerance)."""
    root.mkdir(parents=True, exist_ok=True)
    ref = quadrants()
    out: dict[str, tuple[np.ndarray, int]] = {}

    Image.fromarray(ref).convert("CMYK").save(root / "cmyk.jpg", quality=95, subsampling=0)
    out["cmyk.jpg"] = (ref, 8)

    gray16 = np.full((16, 24), 40_000, dtype=np.uint16)  # 40000 / 65535 of full scale → 155 in 8 bits
    gray16[:, 12:] = 10_000  # → 39
    Image.fromarray(gray16).save(root / "gray16.png")
    out["gray16.png"] = (np.repeat((gray16 >> 8).astype(np.uint8)[..., None], 3, axis=2), 1)

    rgb48 = np.zeros((8, 8, 3), dtype=">u2")
    rgb48[...] = (50_000, 20_000, 5_000)
    rows = b"".join(b"\x00" + rgb48[y].tobytes() for y in range(8))
    (root / "rgb48.png").write_bytes(png_bytes(8, 8, 16, 2, rows))
    out["rgb48.png"] = (np.full((8, 8, 3), (50_000 >> 8, 20_000 >> 8, 5_000 >> 8), dtype=np.uint8), 1)

    Image.fromarray(ref).quantize(colors=4).save(root / "palette.png")
    out["palette.png"] = (ref, 0)

    gray = np.tile(np.arange(0, 256, 16, dtype=np.uint8), (8, 1))
    Image.fromarray(gray, mode="L").save(root / "gray.png")
    out["gray.png"] = (np.repeat(gray[..., None], 3, axis=2), 0)

    rgba = np.zeros((8, 8, 4), dtype=np.uint8)
    rgba[:, :4] = (255, 0, 0, 255)  # opaque red
    rgba[:, 4:] = (0, 0, 0, 0)  # fully transparent (stored black): a viewer shows the background
    Image.fromarray(rgba, mode="RGBA").save(root / "alpha.png")
    expect = np.zeros((8, 8, 3), dtype=np.uint8)
    expect[:, :4], expect[:, 4:] = (255, 0, 0), (255, 255, 255)  # composited on white, as transformers does
    out["alpha.png"] = (expect, 0)

    pal = Image.fromarray(np.array([[0, 1], [1, 0]], dtype=np.uint8), mode="P")
    pal.putpalette([0, 0, 255, 0, 0, 0] + [0] * 762)
    pal.save(root / "palette_transparent.png", transparency=1)  # index 1 (black) is transparent
    out["palette_transparent.png"] = (
        np.array([[[0, 0, 255], [255] * 3], [[255] * 3, [0, 0, 255]]], np.uint8),
        0,
    )

    for orientation in (2, 3, 6, 8):
        out[f"exif{orientation}.jpg"] = (exif_rotated(root / f"exif{orientation}.jpg", orientation), 8)
    return out


def write_hostile(root: Path) -> dict[str, str]:
    """Broken or malicious image files in `root`: file name → the bad-sample kind they must be reported as."""
    root.mkdir(parents=True, exist_ok=True)
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(root / "whole.jpg", quality=90)
    data = (root / "whole.jpg").read_bytes()
    (root / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (root / "whole.jpg").unlink()
    (root / "empty.jpg").write_bytes(b"")
    (root / "text.jpg").write_text("this is a text file with a .jpg name\n")
    one_row = b"\x00" + b"\x00" * 3
    # Headers claiming 100,000² and 12,000² pixels (a few hundred bytes on disk): decoding them would need
    # gigabytes. The first trips PIL's own bomb guard, the second only the recipe's max_image_pixels.
    (root / "bomb.png").write_bytes(png_bytes(100_000, 100_000, 8, 2, one_row))
    (root / "bomb12k.png").write_bytes(png_bytes(12_000, 12_000, 8, 2, one_row))
    return {
        "truncated.jpg": "unreadable_image",
        "empty.jpg": "unreadable_image",
        "text.jpg": "unreadable_image",
        "bomb.png": "oversized_image",
        "bomb12k.png": "oversized_image",
    }
