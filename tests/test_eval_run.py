"""`mllm eval` end to end on a small LLaVA-format set whose right answers are known; the blind (swapped-image) control."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import make_checkpoint, make_image
from PIL import Image

TYPES = ["shape", "color", "shape", "color", "shape", "color"]
CORRECT = {0, 1, 2, 4}  # shape: 3/3 right, color: 1/3 right


@pytest.fixture(scope="module")
def setup(tmp_path_factory, backbones):
    from mllm.config import ConnectorConfig, LLMConfig, ModelConfig, VisionConfig
    from mllm.inference import SamplingConfig, generate, load_pretrained

    root = tmp_path_factory.mktemp("eval")
    cfg = ModelConfig(
        vision=VisionConfig(path=backbones["clip"]),
        connector=ConnectorConfig(kind="mlp"),
        llm=LLMConfig(path=backbones["llama"], mode="full"),
        dtype="fp32",
    )
    ckpt = make_checkpoint(root / "ckpt", cfg, seed=2)
    (root / "images").mkdir()
    for i in range(3):
        make_image(20 + i).save(root / "images" / f"{i}.png")
    model, processor = load_pretrained(ckpt)
    greedy = SamplingConfig(max_new_tokens=4)
    records = []
    for k, kind in enumerate(TYPES):
        image = f"images/{k // 2}.png"  # two questions per image
        question = f"<image>\nWhat {kind} is it?"
        answer = generate(
            model, processor, [Image.open(root / image)], [{"role": "user", "content": question}], greedy
        )
        reference = answer if k in CORRECT else "zzz wrong"
        records.append({
            "id": f"q{k}",
            "image": image,
            "question_type": kind,
            "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": reference}],
        })  # fmt: skip
    data = root / "qa.json"
    data.write_text(json.dumps(records))
    return ckpt, data, root


def test_eval_reports_the_known_accuracy(setup, tmp_path, capsys):
    from mllm.cli import main

    ckpt, data, _ = setup
    out = tmp_path / "out"
    argv = [
        "eval",
        ckpt,
        "--data",
        str(data),
        "--output",
        str(out),
        "--max-new-tokens",
        "4",
        "--batch-size",
        "4",
    ]
    assert main(argv) == 0
    scores = json.loads((out / "scores.json").read_text())
    assert scores["n"] == 6 and scores["run"]["metric"] == "qa"
    assert scores["exact_match"] == pytest.approx(100 * 4 / 6) and scores["vqa_accuracy"] == pytest.approx(
        100 * 4 / 6
    )
    assert scores["per_type"]["shape"]["vqa_accuracy"] == 100.0
    assert scores["per_type"]["color"]["vqa_accuracy"] == pytest.approx(100 / 3)
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == [f"q{k}" for k in range(6)]
    assert all((r["prediction"] == r["reference"]) == (k in CORRECT) for k, r in enumerate(rows))
    assert "overall" in capsys.readouterr().out


def test_several_data_files_load_the_model_once_and_score_each_as_alone(setup, tmp_path, monkeypatch, capsys):
    import mllm.inference as inference
    from mllm.cli import main

    ckpt, data, _ = setup
    records = json.loads(data.read_text())
    (tmp_path / "shapes.json").write_text(json.dumps(records[0::2]))  # the three shape questions: all right
    second = tmp_path / "other"
    second.mkdir()
    (second / "qa.json").write_text(json.dumps(records[1::2]))  # the colour ones: 1 of 3
    loads = []
    real = inference.load_pretrained
    monkeypatch.setattr(inference, "load_pretrained", lambda *a, **k: loads.append(a) or real(*a, **k))
    files = [str(data), str(tmp_path / "shapes.json"), str(second / "qa.json")]
    out = tmp_path / "out"
    argv = ["eval", ckpt, "--data", *files, "--output", str(out), "--image-root", str(data.parent)]
    argv += ["--max-new-tokens", "4", "--batch-size", "4"]
    assert main(argv) == 2  # qa.json twice
    assert "['qa'] would write to the same --output sub-directory" in capsys.readouterr().err
    assert loads == []  # refused before any model load
    assert main(argv[:3] + files[1:] + argv[6:]) == 0
    assert len(loads) == 1
    shapes, colours = (json.loads((out / name / "scores.json").read_text()) for name in ("shapes", "qa"))
    assert (shapes["n"], shapes["vqa_accuracy"]) == (3, 100.0)
    assert (colours["n"], colours["vqa_accuracy"]) == (3, pytest.approx(100 / 3))
    assert colours["run"]["data"] == str(second / "qa.json")
    paired = [str(tmp_path / "a"), str(tmp_path / "b")]  # one --output per file, in their order
    assert main(argv[:3] + files[1:] + ["--output", *paired] + argv[8:]) == 0
    assert json.loads((tmp_path / "b" / "scores.json").read_text()) | {"run": 0} == colours | {"run": 0}
    assert main(argv[:3] + files[1:] + ["--output", "x", "y", "z"] + argv[8:]) == 2
    assert "3 directories for 2 --data files" in capsys.readouterr().err


def test_swap_images_shows_every_sample_another_image(setup, tmp_path):
    from mllm.cli import main

    ckpt, data, root = setup
    out = tmp_path / "blind"
    argv = [
        "eval",
        ckpt,
        "--data",
        str(data),
        "--output",
        str(out),
        "--max-new-tokens",
        "4",
        "--swap-images",
        "--seed",
        "3",
    ]
    assert main(argv) == 0
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    for r in rows:
        shown, own = r["images"], r["own_images"]
        assert shown != own
        pixels = [np.asarray(Image.open(p)) for p in (shown[0], own[0])]
        assert not np.array_equal(*pixels), f"{r['id']} was shown its own image content"
    assert json.loads((out / "scores.json").read_text())["run"]["swap_images"] is True


def test_swap_images_is_a_seeded_derangement_over_shared_images():
    from mllm.eval.data import EvalItem, swap_images

    items = [
        EvalItem(f"q{i}", [{"role": "user", "content": "<image>\nq"}], [f"{i % 4}.png"], "/r", "a")
        for i in range(12)
    ]
    items.append(EvalItem("text", [{"role": "user", "content": "q"}], [], "/r", "a"))
    for seed in range(5):
        swapped = swap_images(items, seed)
        assert (
            all(s.images != it.images for s, it in zip(swapped[:-1], items[:-1], strict=True))
            and swapped[-1].images == []
        )
        same_image = [s.images[0] for s, it in zip(swapped, items, strict=True) if it.images == ["0.png"]]
        assert len(set(same_image)) == 1, "questions about one image are all shown the same other image"
    assert [s.images for s in swap_images(items, 1)] == [s.images for s in swap_images(items, 1)]
    with pytest.raises(ValueError, match="at least two different image sets"):
        swap_images(items[:1], 0)


def test_caption_data_is_detected_and_scored(setup, tmp_path):
    from mllm.cli import main

    ckpt, _, root = setup
    caps = [{"id": f"c{i}", "image": f"images/{i}.png", "conversations": [
        {"from": "human", "value": "<image>\nDescribe the image."},
        {"from": "gpt", "value": "A photo of a red circle on a white background near a window."}]} for i in range(3)]  # fmt: skip
    data = root / "captions.jsonl"
    data.write_text("\n".join(json.dumps(c) for c in caps))
    out = tmp_path / "cap"
    assert main(["eval", ckpt, "--data", str(data), "--output", str(out), "--max-new-tokens", "6"]) == 0
    scores = json.loads((out / "scores.json").read_text())
    assert scores["run"]["metric"] == "caption" and {"bleu4", "rouge_l", "cider", "vqa_accuracy"} <= set(
        scores
    )


def test_bad_eval_data_gets_one_line(setup, tmp_path, capsys):
    from mllm.cli import main

    ckpt, _, _ = setup
    data = tmp_path / "bad.json"
    data.write_text(json.dumps([{"id": "x", "conversations": [{"from": "human", "value": "hi"}]}]))
    assert main(["eval", ckpt, "--data", str(data)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no_question_answer" in err[0] and "'x'" in err[0]


def test_eval_folds_lora_adapters_unless_asked_to_keep_them(setup, tmp_path, backbones, monkeypatch):
    """`mllm eval` merges a LoRA checkpoint's adapters before answering (same predictions); --keep-adapters does not."""
    import mllm.export.merge
    from mllm.cli import main
    from mllm.config import ConnectorConfig, LLMConfig, LoraSettings, ModelConfig, VisionConfig

    _, data, root = setup
    cfg = ModelConfig(
        vision=VisionConfig(path=backbones["clip"]),
        connector=ConnectorConfig(kind="mlp"),
        llm=LLMConfig(path=backbones["llama"], mode="lora", lora=LoraSettings(r=4, alpha=8)),
        dtype="fp32",
    )
    ckpt = make_checkpoint(tmp_path / "lora", cfg, seed=3)
    merged = []
    real_merge = mllm.export.merge.merge_lora
    monkeypatch.setattr(mllm.export.merge, "merge_lora", lambda model: merged.append(1) or real_merge(model))
    predictions = {}
    for name, extra in (("merged", []), ("kept", ["--keep-adapters"])):
        out = tmp_path / name
        argv = ["eval", ckpt, "--data", str(data), "--output", str(out), "--max-new-tokens", "4", *extra]
        assert main(argv) == 0
        rows = (out / "predictions.jsonl").read_text().splitlines()
        predictions[name] = [json.loads(r)["prediction"] for r in rows]
        assert len(merged) == 1, f"{name}: merge_lora called {len(merged)} time(s)"
    assert predictions["merged"] == predictions["kept"]


def test_image_folder_for_a_bare_llava_json(setup, tmp_path, capsys):
    """LLaVA's layout: `--data ann/qa.json --image-folder images/`, image paths relative to that folder."""
    from mllm.cli import main

    ckpt, data, root = setup
    records = json.loads(data.read_text())
    for r in records:
        r["image"] = r["image"].removeprefix("images/")
    (tmp_path / "ann").mkdir()
    (tmp_path / "ann" / "qa.json").write_text(json.dumps(records))
    argv = ["eval", ckpt, "--data", str(tmp_path / "ann" / "qa.json"), "--max-new-tokens", "4"]
    assert main([*argv, "--output", str(tmp_path / "out"), "--image-folder", str(root / "images")]) == 0
    assert json.loads((tmp_path / "out" / "scores.json").read_text())["exact_match"] == pytest.approx(400 / 6)
    assert main(argv) == 2  # the images are not beside the JSON file
    assert "missing_image" in capsys.readouterr().err
    records[0]["image"] = "../qa.json"  # leaves the image folder: refused, never opened
    (tmp_path / "ann" / "qa.json").write_text(json.dumps(records))
    assert main([*argv, "--image-root", str(root / "images")]) == 2
    assert "unsafe_image_path" in capsys.readouterr().err
