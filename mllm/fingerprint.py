"""File fingerprints: one short hash of what a file or folder holds, for cache keys and run identities.

Used for the length-scan cache key and a run's data fingerprint (by content) and for vision-tower identities
behind the feature cache (by size and modification time: weight files are large and rarely rewritten).
"""

from __future__ import annotations

import hashlib
import os

FULL_HASH_BYTES = 64 << 20
"""Files up to this size are hashed by their whole content; larger ones by their size and sampled blocks."""
SAMPLED_BLOCKS = 64
"""A larger file: this many evenly spaced BLOCK-byte blocks (first and last included) are hashed, 16 MiB in all."""
BLOCK = 256 << 10


def file_fingerprint(
    path: str | os.PathLike,
    *,
    content: bool = True,
    mtime: bool = False,
    suffixes: tuple[str, ...] | None = None,
) -> str:
    """Hex digest (32 characters) of the file at `path`, or of every file below a folder, in name order.

    Each file counts by its path relative to `path` (a lone file: its name, so a moved file keeps its
    fingerprint), its size, with `mtime` its modification time in nanoseconds, and with `content` its bytes
    (above `FULL_HASH_BYTES`: `SAMPLED_BLOCKS` blocks, so an edit that keeps the size and misses them goes
    unseen). `suffixes`: in a folder, only files whose names end so count.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        files = sorted(os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs)
        files = [f for f in files if suffixes is None or f.endswith(suffixes)]
        names = [os.path.relpath(f, path) for f in files]
    else:
        files, names = [path], [os.path.basename(path)]
    h = hashlib.blake2b(digest_size=16)
    for name, file in zip(names, files, strict=True):
        st = os.stat(file)
        h.update(f"{name}|{st.st_size}|{st.st_mtime_ns if mtime else ''}|".encode())
        if content:
            _hash_content(file, st.st_size, h)
    return h.hexdigest()


def _hash_content(path: str, size: int, h) -> None:
    with open(path, "rb") as f:
        if size <= FULL_HASH_BYTES:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
            return
        for k in range(SAMPLED_BLOCKS):
            f.seek((size - BLOCK) * k // (SAMPLED_BLOCKS - 1))
            h.update(f.read(BLOCK))
