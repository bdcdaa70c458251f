"""`mllm data check` (report, bad-sample JSONL, exit code) and `mllm data show`; length cache and parallel scans."""

from __future__ import annotations

import json

from test_data_bad_samples import CASES, make_data

from mllm.cli import main
from mllm.data import build_dataset, load_recipe
from mllm.data import scan as scan_module
from mllm.testing.tokenizers import make_tokenizer


def test_check_reports_every_bad_sample_and_fails(tmp_path, capsys):
    recipe = make_data(tmp_path)
    make_tokenizer("llama").save_pretrained(tmp_path / "tok")
    out = tmp_path / "bad.jsonl"
    args = [
        "data",
        "check",
        recipe,
        "--tokenizer",
        str(tmp_path / "tok"),
        "--image-tokens",
        "4",
        "--no-progress",
    ]
    rc = main([*args, "--bad-samples", str(out), "--workers", "2"])
    text = capsys.readouterr().out
    assert rc == 1
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    expected = sorted(c[2] for c in CASES if c[2])
    assert sorted(r["kind"] for r in lines) == expected
    assert all(r["source"] == "data.jsonl" and r["line"] >= 1 for r in lines)
    assert "data.jsonl" in text and "missing_image" in text and "token lengths" in text
    assert f"{len(CASES)} samples, {len(expected)} bad" in text
    assert main([*args, "--bad-samples", str(out), "--threshold", "100%"]) == 0


def test_show_marks_supervised_spans(tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text(
        json.dumps(
            {
                "id": "x",
                "image": "a.png",
                "conversations": [
                    {"from": "human", "value": "<image>\nWhat shape?"},
                    {"from": "gpt", "value": "A circle."},
                ],
            }
        )
        + "\n"
    )
    make_tokenizer("qwen2").save_pretrained(tmp_path / "tok")
    assert main(["data", "show", str(data), "--tokenizer", str(tmp_path / "tok"), "--image-tokens", "7"]) == 0
    text = capsys.readouterr().out
    assert "<image×7>\nWhat shape?" in text
    assert "[[A circle.<|im_end|>]]" in text and "id='x'" in text


def test_lengths_are_cached_and_parallel_scans_agree(tmp_path, monkeypatch):
    data = tmp_path / "d.jsonl"
    rows = [
        {
            "id": str(i),
            "conversations": [
                {"from": "human", "value": "Hi " * (i % 17)},
                {"from": "gpt", "value": "Yes " * (1 + i % 5)},
            ],
        }
        for i in range(1100)
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tok = make_tokenizer("llama")
    recipe = load_recipe(str(data), cache_dir=str(tmp_path / "cache"), template="llama3")
    parallel = build_dataset(recipe, tok, 4, None, workers=2, progress=False)
    serial = build_dataset(
        load_recipe(str(data), cache_dir="none", template="llama3"), tok, 4, None, workers=0, progress=False
    )
    assert parallel.lengths == serial.lengths and len(parallel) == 1100
    assert len(list((tmp_path / "cache").iterdir())) == 1

    def no_scan(*a, **k):
        raise AssertionError("the cached lengths should have been used")

    monkeypatch.setattr(scan_module, "scan", no_scan)
    assert build_dataset(recipe, tok, 4, None, progress=False).lengths == serial.lengths
    with data.open("a") as f:  # new data → new cache key → a new scan
        f.write(json.dumps(rows[0]) + "\n")
    try:
        build_dataset(recipe, tok, 4, None, progress=False)
        raise RuntimeError("expected a rescan")
    except AssertionError as e:
        assert "cached lengths" in str(e)


def llava_layout(tmp_path, image: str = "a.png"):
    """LLaVA's own layout: annotations in one folder, images in another named by --image-folder."""
    from PIL import Image

    (tmp_path / "ann").mkdir(parents=True)
    (tmp_path / "images").mkdir()
    Image.new("RGB", (8, 8), "red").save(tmp_path / "images" / "a.png")
    (tmp_path / "secret.png").write_bytes((tmp_path / "images" / "a.png").read_bytes())
    record = {"id": "s0", "image": image, "conversations": [{"from": "human", "value": "<image>\nColour?"}]}
    record["conversations"].append({"from": "gpt", "value": "Red."})
    (tmp_path / "ann" / "data.json").write_text(json.dumps([record]))
    return str(tmp_path / "ann" / "data.json")


def test_check_a_bare_llava_json_with_its_image_folder(tmp_path, capsys, monkeypatch):
    data = llava_layout(tmp_path)
    make_tokenizer("llama").save_pretrained(tmp_path / "tok")
    monkeypatch.chdir(tmp_path)  # a relative --image-root is relative to where the user is
    args = ["data", "check", data, "--tokenizer", "tok", "--image-tokens", "4", "--no-progress"]
    args += ["--bad-samples", str(tmp_path / "bad.jsonl")]
    assert main([*args, "--image-folder", "images"]) == 0
    assert main([*args, "--image-root", "images"]) == 0
    assert main(args) == 1  # without it, images resolve beside the JSON file: missing
    assert json.loads((tmp_path / "bad.jsonl").read_text())["kind"] == "missing_image"
    (tmp_path / "ann" / "data.json").unlink()
    llava_layout(tmp_path / "escape", image="../secret.png")
    escape = [
        "--bad-samples",
        str(tmp_path / "bad.jsonl"),
        "--image-folder",
        str(tmp_path / "escape" / "images"),
    ]
    assert main([*args[:2], str(tmp_path / "escape" / "ann" / "data.json"), *args[3:8], *escape]) == 1
    assert json.loads((tmp_path / "bad.jsonl").read_text())["kind"] == "unsafe_image_path"
    capsys.readouterr()
