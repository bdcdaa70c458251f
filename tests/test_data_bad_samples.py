"""Every kind of bad sample is caught with its reason, location and id: `error` stops, `skip` records and goes on."""

from __future__ import annotations

import functools
import json
import os

import pytest
from PIL import Image

from mllm.data import BadSampleError, build_dataset, load_recipe
from mllm.testing.tokenizers import make_tokenizer


@functools.lru_cache
def tokenizer():
    return make_tokenizer("llama")


def conv(q="<image>\nWhat is it?", a="A circle."):
    return [{"from": "human", "value": q}, {"from": "gpt", "value": a}]


# (id, record or raw line, expected kind); images are prepared by `make_data`
CASES = [
    ("good", {"image": "ok.png", "conversations": conv()}, None),
    ("missing", {"image": "nope.png", "conversations": conv()}, "missing_image"),
    ("garbage", {"image": "garbage.jpg", "conversations": conv()}, "unreadable_image"),
    ("huge", {"image": "big.png", "conversations": conv()}, "oversized_image"),
    ("mismatch", {"image": "ok.png", "conversations": conv(q="What is it?")}, "image_count_mismatch"),
    ("extra_placeholder", {"conversations": conv()}, "image_count_mismatch"),
    ("empty", {"conversations": []}, "empty_conversation"),
    ("no_answer", {"conversations": [{"from": "human", "value": "Hi"}]}, "no_assistant_turn"),
    ("blank_answer", {"conversations": conv(q="Hi", a="  ")}, "empty_answer"),
    (
        "robot",
        {"conversations": [{"from": "robot", "value": "Hi"}, {"from": "gpt", "value": "Yo"}]},
        "unknown_role",
    ),
    ("dotdot", {"image": "../outside.png", "conversations": conv()}, "unsafe_image_path"),
    ("absolute", {"image": "ABSOLUTE_OUTSIDE", "conversations": conv()}, "unsafe_image_path"),
    ("symlink", {"image": "link.png", "conversations": conv()}, "unsafe_image_path"),
    ("too_long", {"conversations": conv(q="word " * 300)}, "answer_truncated"),
    ("broken_json", '{"id": "broken_json", "conversations": [', "invalid_json"),
]
BUILD_TIME = {
    "image_count_mismatch",
    "empty_conversation",
    "no_assistant_turn",
    "empty_answer",
    "unknown_role",
    "answer_truncated",
    "invalid_json",
}


def make_data(tmp_path) -> str:
    root = tmp_path / "images"
    root.mkdir()
    Image.new("RGB", (8, 8), "red").save(root / "ok.png")
    Image.new("RGB", (100, 100), "red").save(root / "big.png")
    (root / "garbage.jpg").write_bytes(b"\xff\xd8\xff this is not a jpeg")
    outside = tmp_path / "outside.png"
    Image.new("RGB", (8, 8), "blue").save(outside)
    os.symlink(outside, root / "link.png")
    lines = []
    for sid, rec, _ in CASES:
        if isinstance(rec, str):
            lines.append(rec)
            continue
        rec = {"id": sid, **rec}
        if rec.get("image") == "ABSOLUTE_OUTSIDE":
            rec["image"] = str(outside)
        lines.append(json.dumps(rec))
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(lines) + "\n")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        "name: bad\nimage_root: images\ntemplate: llama3\nmax_length: 64\nmax_image_pixels: 5000\n"
        "on_bad_sample: skip\nsources:\n  - path: data.jsonl\n"
    )
    return str(recipe)


def test_skip_records_every_kind_with_its_location(tmp_path, caplog):
    recipe = load_recipe(make_data(tmp_path))
    ds = build_dataset(recipe, tokenizer(), image_tokens=4, preprocess=None, progress=False)
    items = [ds[i] for i in range(len(ds))]
    got = {r["id"] or "broken_json": r for r in ds.skipped()}  # an unparsable line has no id
    expected = {sid: kind for sid, _, kind in CASES if kind}
    assert {sid: got[sid]["kind"] for sid in got} == expected
    for sid, r in got.items():
        line = [c[0] for c in CASES].index(sid) + 1
        assert r["line"] == line and r["source"] == "data.jsonl" and r["index"] == line - 1
    ok = [it for it in items if it is not None]
    assert [it["id"] for it in ok] == ["good"]
    assert "skipping bad sample (source data.jsonl, line 2, id 'missing'): [missing_image]" in caplog.text


@pytest.mark.parametrize("sid,kind", [(c[0], c[2]) for c in CASES if c[2]])
def test_error_policy_stops_with_source_line_id_and_reason(tmp_path, sid, kind):
    recipe = load_recipe(make_data(tmp_path), on_bad_sample="error")
    data = tmp_path / "data.jsonl"
    lines = data.read_text().splitlines()
    keep = [0, [c[0] for c in CASES].index(sid)]
    data.write_text("\n".join(lines[i] for i in keep) + "\n")
    with pytest.raises(BadSampleError) as err:
        ds = build_dataset(recipe, tokenizer(), image_tokens=4, preprocess=None, progress=False)
        assert kind not in BUILD_TIME, "text-level problems must stop the build, before any training"
        for i in range(len(ds)):
            ds[i]
    e = err.value
    assert e.kind == kind and e.source == "data.jsonl" and e.line == 2
    assert f"[{kind}]" in str(e) and "line 2" in str(e)
    if kind != "invalid_json":
        assert e.sample_id == sid and repr(sid) in str(e)


def test_exif_orientation_is_applied(tmp_path):
    img = Image.new("RGB", (30, 10), "red")
    exif = img.getexif()
    exif[0x0112] = 6  # rotated 90°: the upright image is 10 wide, 30 high
    img.save(tmp_path / "rot.jpg", exif=exif)
    from mllm.data.images import open_image

    assert open_image("rot.jpg", str(tmp_path), 10**6).size == (10, 30)
    assert open_image((tmp_path / "rot.jpg").read_bytes(), str(tmp_path), 10**6).mode == "RGB"


def test_skip_during_training_collects_from_dataloader_workers(tmp_path):
    import torch

    from mllm.data import Collator

    recipe = load_recipe(make_data(tmp_path))
    ds = build_dataset(recipe, tokenizer(), image_tokens=4, preprocess=None, progress=False)
    ds.skip_log = str(tmp_path / "skipped.jsonl")
    loader = torch.utils.data.DataLoader(
        ds, batch_size=3, num_workers=1, collate_fn=Collator(tokenizer().pad_token_id)
    )
    ids = [sid for batch in loader for sid in batch["sample_ids"]]
    assert ids == ["good"]
    assert {r["kind"] for r in ds.skipped()} == {c[2] for c in CASES if c[2]}  # build-time + worker-time
    assert len(ds.skipped()) == len([c for c in CASES if c[2]])
