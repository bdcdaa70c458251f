"""Reading every selected sample once: exact lengths for batching (cached on disk) and, for `mllm data check`, images.

Large scans run in worker processes (fork: they inherit the opened sources
and tokenizer instead of re-reading them) with a progress bar.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
from dataclasses import dataclass, field

import numpy as np
from tqdm.auto import tqdm

from mllm.data.errors import BadSampleError
from mllm.data.reader import SampleReader
from mllm.data.recipe import Recipe
from mllm.fingerprint import file_fingerprint

CACHE_VERSION = 4  # 4: a tokenizer.json's own padding / truncation no longer applied (encode.plain_backend)
"""Bump when tokenisation or validation changes, so old length caches are not reused."""
PARALLEL_MIN = 20_000
"""Below this many samples a scan runs in-process: starting workers costs more than it saves."""
CHUNK = 512


@dataclass
class ScanResult:
    """Per scanned sample, in task order. `length` is -1 for a bad sample (see `bad`)."""

    source: np.ndarray
    index: np.ndarray
    length: np.ndarray
    full_length: np.ndarray
    has_image: np.ndarray
    bad: dict[int, dict] = field(default_factory=dict)
    """Position in the task list → bad-sample record."""


def _scan_one(reader: SampleReader, si: int, idx: int, check_images: bool):
    try:
        sample, enc = reader.encode(si, idx)
        if check_images:  # every referenced image, decoded
            reader.load_images(sample, si)
        return len(enc.input_ids), enc.full_length, enc.num_images > 0, None
    except BadSampleError as e:
        return -1, 0, False, reader.locate(e, si, idx).record()


_worker_reader: SampleReader | None = None  # set once per worker process by _init_worker (process-local)


def _init_worker(reader: SampleReader) -> None:
    global _worker_reader
    _worker_reader = reader


def _scan_chunk(args):
    tasks, check_images = args
    return [_scan_one(_worker_reader, si, idx, check_images) for si, idx in tasks]


def scan(
    reader: SampleReader,
    tasks: list[tuple[int, int]],
    *,
    check_images: bool = False,
    workers: int | None = None,
    progress: bool = True,
    desc: str = "reading samples",
) -> ScanResult:
    """Encode (and optionally open the images of) every (source, index) task."""
    if workers is None:
        workers = min(os.cpu_count() or 1, 8) if len(tasks) >= PARALLEL_MIN else 0
    chunks = [tasks[i : i + CHUNK] for i in range(0, len(tasks), CHUNK)]
    bar = tqdm(total=len(tasks), desc=desc, unit="sample", disable=not progress, leave=False)
    out = []
    if workers > 1 and len(chunks) > 1 and "fork" in mp.get_all_start_methods():
        with mp.get_context("fork").Pool(workers, initializer=_init_worker, initargs=(reader,)) as pool:
            for res in pool.imap(_scan_chunk, [(c, check_images) for c in chunks]):
                out += res
                bar.update(len(res))
    else:
        for c in chunks:
            out += [_scan_one(reader, si, idx, check_images) for si, idx in c]
            bar.update(len(c))
    bar.close()
    return ScanResult(
        source=np.array([t[0] for t in tasks], dtype=np.int64),
        index=np.array([t[1] for t in tasks], dtype=np.int64),
        length=np.array([r[0] for r in out], dtype=np.int64),
        full_length=np.array([r[1] for r in out], dtype=np.int64),
        has_image=np.array([r[2] for r in out], dtype=bool),
        bad={k: r[3] for k, r in enumerate(out) if r[3] is not None},
    )


# ---- on-disk cache of length scans ----------------------------------------------------------------
def cache_key(reader: SampleReader, tasks: list[tuple[int, int]]) -> str:
    r, enc, tok = reader.recipe, reader.encoder, reader.encoder.tokenizer
    h = hashlib.blake2b(digest_size=16)
    h.update(
        json.dumps([CACHE_VERSION, r.template, r.max_length, r.system_prompt, enc.image_tokens]).encode()
    )
    h.update(repr(reader.layout).encode())  # image counts follow the layout and its budgets
    h.update(json.dumps([tok.chat_template, tok.bos_token, tok.eos_token]).encode())
    h.update(enc.backend.to_str().encode())  # the backend that encodes (saved padding / truncation lifted)
    for src in reader.sources:
        s = src.spec
        h.update(json.dumps([s.path, s.format, s.image_column, s.text_column, s.prompt, s.split]).encode())
        for path in src.files():
            h.update(file_fingerprint(path, mtime=True).encode())
    h.update(np.asarray(tasks, dtype=np.int64).tobytes())
    return h.hexdigest()


def cache_dir(recipe: Recipe) -> str | None:
    if recipe.cache_dir == "none":
        return None
    if recipe.cache_dir:
        return recipe.cache_dir
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "mllm", "lengths")


def load_cached(path: str) -> ScanResult | None:
    try:
        with np.load(path, allow_pickle=False) as z:
            bad = json.loads(str(z["bad"]))
            return ScanResult(
                z["source"],
                z["index"],
                z["length"],
                z["full_length"],
                z["has_image"],
                {int(k): v for k, v in bad.items()},
            )
    except (OSError, KeyError, ValueError):
        return None


def save_cached(path: str, res: ScanResult) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp.npz"
    np.savez(
        tmp,
        source=res.source,
        index=res.index,
        length=res.length,
        full_length=res.full_length,
        has_image=res.has_image,
        bad=np.array(json.dumps(res.bad)),
    )
    os.replace(tmp, path)  # atomic: concurrent ranks never read a half-written cache


def cached_length_scan(
    reader: SampleReader, tasks: list[tuple[int, int]], *, workers=None, progress=True
) -> ScanResult:
    folder = cache_dir(reader.recipe)
    path = os.path.join(folder, cache_key(reader, tasks) + ".npz") if folder else None
    if path and (hit := load_cached(path)) is not None:
        return hit
    res = scan(reader, tasks, workers=workers, progress=progress, desc=f"tokenising {reader.recipe.name}")
    if path:
        save_cached(path, res)
    return res
