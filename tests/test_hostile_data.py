"""A hostile data corpus (tests/hostile): broken, malicious and merely unusual inputs mixed with good samples.

Unusual images load upright as 8-bit RGB with the right pixels; every bad sample is reported with its kind,
location and id (`skip`) or stops the run at the first one (`error`); no file outside the image root is opened.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hostile.corpus import IMAGE_TOKENS, write_corpus

from mllm.data import BadSampleError, Collator, build_dataset, load_recipe
from mllm.data.images import open_image
from mllm.testing.tokenizers import make_tokenizer


@functools.lru_cache
def tokenizer():
    return make_tokenizer("llama")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("hostile"))


class OpenedFiles:
    """Every path this process opens inside `with`, seen through the interpreter's `open` audit event (raised by
    builtins.open, io.open and os.open alike, so also by PIL and the JSON readers)."""

    def __init__(self):
        self.paths: list[str] = []
        self.active = False
        sys.addaudithook(self._hook)  # hooks cannot be removed: this one goes quiet after `with`

    def _hook(self, event: str, args) -> None:
        if self.active and event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
            self.paths.append(os.fsdecode(args[0]))

    def __enter__(self):
        self.active = True
        return self

    def __exit__(self, *exc):
        self.active = False


def reported(skipped: list[dict]) -> dict[str, dict]:
    """Skip records keyed like `Corpus.expected_bad`: sample id, or `line:N` for a line without a readable id."""
    return {r["id"] if r["id"] is not None else f"line:{r['line']}": r for r in skipped}


@pytest.mark.parametrize("name", ["cmyk.jpg", "gray16.png", "rgb48.png", "palette.png", "gray.png", "alpha.png",
                                  "palette_transparent.png", "exif2.jpg", "exif3.jpg", "exif6.jpg", "exif8.jpg"])  # fmt: skip
def test_unusual_but_valid_images_load_as_upright_rgb(corpus, name):
    expected, tolerance = corpus.valid_images[name]
    img = open_image(name, str(corpus.image_root), 10**7)
    pixels = np.asarray(img)
    assert img.mode == "RGB" and pixels.dtype == np.uint8
    assert pixels.shape == expected.shape, f"{name}: {pixels.shape} (not upright?) vs {expected.shape}"
    worst = int(np.abs(pixels.astype(int) - expected.astype(int)).max())
    assert worst <= tolerance, f"{name}: pixels differ by up to {worst}"


@pytest.fixture(scope="module")
def skipping(corpus):
    """The corpus read with `on_bad_sample: skip`, in this process, every file open recorded: (dataset, items, paths)."""
    recipe = load_recipe(corpus.recipe)
    with OpenedFiles() as opened:
        ds = build_dataset(recipe, tokenizer(), IMAGE_TOKENS, preprocess=None, progress=False)
        items = [ds[i] for i in range(len(ds))]
    return ds, items, opened.paths


def test_skip_reports_every_bad_sample_with_its_reason(corpus, skipping):
    ds, items, _ = skipping
    got = reported(ds.skipped())
    assert {k: r["kind"] for k, r in got.items()} == corpus.expected_bad
    for r in got.values():
        assert r["source"] == "hostile.jsonl" and r["reason"], r
        assert r["line"] == r["index"] + 1, r  # hostile.jsonl has no blank lines
    assert sorted(it["id"] for it in items if it is not None) == sorted(corpus.good_ids)
    assert [ds.items[k].index for k in ds.truncated] == [corpus.good_ids.index("good-1mb-answer")]


def test_no_file_outside_the_image_root_is_ever_opened(corpus, skipping):
    opened = {os.path.realpath(p) for p in skipping[2]}
    assert os.path.realpath(corpus.image_root / "cmyk.jpg") in opened  # the audit hook does see image opens
    forbidden = {os.path.realpath(p) for p in corpus.outside} | {"/etc/passwd"}
    outside_dir = os.path.realpath(corpus.folder / "outside")
    leaked = sorted(p for p in opened if p in forbidden or p.startswith(outside_dir + os.sep))
    assert not leaked, f"opened outside the image root: {leaked}"


def test_skip_through_dataloader_workers_collects_every_report(corpus, skipping, tmp_path):
    ds = skipping[0]
    ds.skip_log = str(tmp_path / "skipped_samples.jsonl")
    loader = torch.utils.data.DataLoader(
        ds, batch_size=4, num_workers=2, collate_fn=Collator(tokenizer().pad_token_id)
    )
    ids = [sid for batch in loader for sid in batch["sample_ids"]]
    assert sorted(ids) == sorted(corpus.good_ids)
    assert {k: r["kind"] for k, r in reported(ds.skipped()).items()} == corpus.expected_bad


def hostile_line(corpus, key: str) -> int:
    """1-based line of hostile.jsonl holding the sample `key` (an id or `line:N`)."""
    return list(corpus.expected_bad).index(key) + 1


def single_bad_recipe(corpus, tmp_path, key: str):
    """A recipe of the first good sample, then only the hostile line `key`, with `on_bad_sample: error`."""
    lines = (corpus.recipe.parent / "hostile.jsonl").read_bytes().split(b"\n")
    (corpus.recipe.parent / f"one_{tmp_path.name}.jsonl").write_bytes(
        lines[hostile_line(corpus, key) - 1] + b"\n"
    )
    good = (corpus.recipe.parent / "good.jsonl").read_text().splitlines()[0]
    (corpus.recipe.parent / f"good_{tmp_path.name}.jsonl").write_text(good + "\n")
    text = corpus.recipe.read_text().replace("on_bad_sample: skip", "on_bad_sample: error")
    text = text.replace(
        "path: hostile.jsonl", f"path: one_{tmp_path.name}.jsonl\n    name: hostile\n    format: llava"
    )
    text = text.replace("path: good.jsonl", f"path: good_{tmp_path.name}.jsonl\n    name: good")
    path = corpus.recipe.parent / f"error_{tmp_path.name}.yaml"
    path.write_text(text)
    return load_recipe(path)


def test_error_policy_stops_at_the_first_bad_sample_naming_it(corpus, tmp_path):
    recipe = load_recipe(corpus.recipe, on_bad_sample="error")
    with pytest.raises(BadSampleError) as err:
        build_dataset(recipe, tokenizer(), IMAGE_TOKENS, preprocess=None, progress=False)
    # image problems surface when a sample is loaded; the first text-level problem stops the build itself
    first = next(k for k in corpus.expected_bad if k not in corpus.found_when_loading)
    e = err.value
    line = hostile_line(corpus, first)
    assert (e.source, e.line, e.index, e.sample_id) == ("hostile.jsonl", line, line - 1, first)
    assert (
        e.kind == corpus.expected_bad[first] == "bad_image_path"
    )  # a remote URL: refused before any download
    assert str(e).startswith(
        f"bad sample (source hostile.jsonl, line {line}, id {first!r}): [bad_image_path]"
    )


@pytest.mark.parametrize("key", [
    "img-truncated.jpg", "img-empty.jpg", "img-text.jpg", "img-bomb.png", "img-bomb12k.png", "dotdot-passwd",
    "absolute-outside", "symlink-file", "symlink-dir", "nul-byte", "url", "line:15", "line:16", "line:17", "line:18", "conv-string",
    "value-int", "image-int", "10k-placeholders-1-image", "10k-placeholders-10k-images", "1mb-question",
    "empty-conversation", "role-robot",
])  # fmt: skip
def test_error_policy_names_source_index_id_and_reason(corpus, tmp_path, key):
    kind = corpus.expected_bad[key]
    recipe = single_bad_recipe(corpus, tmp_path, key)
    with pytest.raises(BadSampleError) as err:
        ds = build_dataset(recipe, tokenizer(), IMAGE_TOKENS, preprocess=None, progress=False)
        assert key in corpus.found_when_loading, (
            "text-level problems must stop the build, before any training"
        )
        for i in range(len(ds)):
            ds[i]
    e = err.value
    assert (e.kind, e.source, e.index, e.line) == (kind, "hostile", 0, 1)
    assert e.reason and f"[{kind}] {e.reason}" in str(e) and "line 1" in str(e) and "record index 0" in str(e)
    if not key.startswith("line:"):
        assert e.sample_id == key and f"id {key!r}" in str(e)


def test_a_bad_sample_met_in_a_dataloader_worker_stops_with_the_same_error(corpus, tmp_path):
    recipe = single_bad_recipe(corpus, tmp_path, "img-truncated.jpg")
    ds = build_dataset(recipe, tokenizer(), IMAGE_TOKENS, preprocess=None, progress=False)
    loader = torch.utils.data.DataLoader(ds, batch_size=1, num_workers=1, collate_fn=Collator(0))
    with pytest.raises(BadSampleError) as err:  # torch re-raises worker errors as type(e)(traceback text)
        list(loader)
    e = err.value
    assert (e.kind, e.source, e.index, e.line, e.sample_id) == (
        "unreadable_image",
        "hostile",
        0,
        1,
        "img-truncated.jpg",
    )
    assert str(e).startswith(
        "bad sample (source hostile, line 1, id 'img-truncated.jpg'): [unreadable_image]"
    )
    assert "Traceback" not in str(e)


ROOT = Path(__file__).resolve().parents[1]


def pretrain(backbones, data: Path, output: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / "scripts" / "pretrain.py"), "--vision", backbones["clip"], "--llm"]
    cmd += [
        backbones["llama"],
        "--data",
        str(data),
        "--output",
        str(output),
        "--dtype",
        "fp32",
        "--lr",
        "1e-3",
    ]
    cmd += [
        "--micro-batch-size",
        "2",
        "--grad-accum",
        "1",
        "--num-workers",
        "2",
        "--warmup-ratio",
        "0",
        *extra,
    ]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_SIZE")}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)


@pytest.mark.slow
def test_a_training_run_over_the_corpus_skips_and_reports_every_bad_sample(backbones, corpus, tmp_path):
    # one epoch draws every sample; some micro-batches hold only bad ones (then a blank row keeps the step going)
    run = pretrain(backbones, corpus.recipe, tmp_path / "run", "--epochs", "1", "--save-every", "0")
    assert run.returncode == 0, run.stderr[-4000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["skipped_samples"] == len(corpus.expected_bad)
    log = tmp_path / "run" / "skipped_samples.jsonl"
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert {k: r["kind"] for k, r in reported(records).items()} == corpus.expected_bad
    assert f"skipped {len(corpus.expected_bad)} bad sample(s); every one and why: {log}" in run.stderr


@pytest.mark.slow
def test_a_training_run_with_on_bad_sample_error_stops_in_one_line(backbones, corpus, tmp_path):
    recipe = single_bad_recipe(corpus, tmp_path, "img-truncated.jpg")
    run = pretrain(backbones, recipe.path, tmp_path / "run", "--max-steps", "3")
    assert run.returncode == 2, run.stderr[-4000:]
    line = (
        "pretrain.py: error: bad sample (source hostile, line 1, id 'img-truncated.jpg'): [unreadable_image]"
    )
    assert line in run.stderr and "(record index 0)" in run.stderr
    assert "Traceback" not in run.stderr
    assert not list((tmp_path / "run").glob("checkpoint-*"))
