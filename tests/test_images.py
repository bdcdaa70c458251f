"""Images as they come: AnyRes tiling (LLaVA-NeXT layout), several images of different token counts per sample,
pixel and token budgets, and clear errors for images that cannot be used (`mllm.data.layout`)."""

from __future__ import annotations

import json
import types
from pathlib import Path

import pytest
import torch
from helpers import make_checkpoint
from PIL import Image

from mllm.config import IMAGE_TOKEN_ID
from mllm.data import BadSampleError, Collator, build_dataset, load_recipe
from mllm.data.check import check_recipe
from mllm.data.images import image_size
from mllm.data.layout import ImageLayout, default_pinpoints

TILE, SIDE = 32, 4  # the tiny CLIP: 32 px input, 8 px patches → a 4×4 grid of 16 tokens per tile
SIZES = [(70, 30), (30, 70), (33, 33), (100, 20), (64, 64), (31, 95), (5, 3), (128, 40)]


def anyres(**kw) -> ImageLayout:
    kw = {"tile_tokens": SIDE * SIDE, "tile_size": TILE, **kw}
    return ImageLayout("anyres", grid_pinpoints=tuple(map(tuple, default_pinpoints(TILE, 4))), **kw)


# ---- the layout: token counts and arrangement exactly as transformers' LLaVA-NeXT -----------------------------
def test_anyres_arrangement_and_counts_match_transformers_llava_next():
    from transformers.models.llava_next.modeling_llava_next import LlavaNextModel, image_size_to_num_patches

    layout = anyres()
    pinpoints = default_pinpoints(TILE, 4)
    hf_self = types.SimpleNamespace(  # what pack_image_features reads of its model
        config=types.SimpleNamespace(
            vision_config=types.SimpleNamespace(image_size=TILE, patch_size=TILE // SIDE),
            image_grid_pinpoints=pinpoints,
        )
    )
    newline = torch.randn(6)
    for w, h in SIZES:
        tiles = layout.num_tiles((w, h))
        assert tiles == image_size_to_num_patches((h, w), pinpoints, TILE)
        feats = torch.randn(tiles, SIDE * SIDE, 6)
        ours = layout.arrange(feats, (w, h), newline)
        theirs, lens = LlavaNextModel.pack_image_features(
            hf_self, [feats], torch.tensor([[h, w]]), "default", newline
        )
        assert torch.equal(ours, theirs[0]), (w, h)
        assert ours.shape[0] == layout.num_tokens((w, h)) == lens[0], (w, h)


def test_wide_and_tall_images_get_grids_of_their_shape():
    layout = anyres()
    assert layout.num_tiles((64, 32)) == 1 + 2 and layout.num_tiles((32, 64)) == 1 + 2
    wide, tall = layout.pixels([Image.new("RGB", (64, 32)), Image.new("RGB", (32, 64))], _stack)
    assert wide.shape == (6, 3, TILE, TILE) and tall.tolist() == [[64, 32], [32, 64]]
    # 16 thumbnail tokens + the 4×8 map with a newline per row (no padding to cut: the image fills its grid)
    assert layout.num_tokens((64, 32)) == 16 + 4 * (8 + 1)
    assert layout.num_tokens((32, 64)) == 16 + 8 * (4 + 1)
    square = ImageLayout("square", tile_tokens=16, tile_size=TILE)
    assert square.num_tokens((64, 32)) == square.num_tokens((32, 64)) == 16


def test_pad_centres_the_image_on_the_mean_colour():
    layout = ImageLayout("pad", tile_tokens=16, tile_size=TILE, fill=(10, 20, 30))
    tiles, _ = layout.pixels([Image.new("RGB", (40, 20), (255, 255, 255))], _stack)
    (square,) = tiles
    assert square.shape == (3, 40, 40) and square[:, 0, 0].tolist() == [10, 20, 30]
    assert square[:, 20, 20].tolist() == [255, 255, 255] and layout.num_tokens((40, 20)) == 16


def _stack(images: list[Image.Image]) -> torch.Tensor:
    """A preprocess that keeps the pixels as they are ([N, 3, H, W], 0..255)."""
    import numpy as np

    return torch.stack([torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1) for im in images])


# ---- budgets -----------------------------------------------------------------------------------------------
def test_pixel_budgets_scale_images_into_range_keeping_their_shape():
    layout = anyres(min_pixels=32 * 32, max_pixels=64 * 64)
    assert layout.fit(640, 320) == (90, 45)  # 4050 ≤ 4096 pixels, 2:1 kept
    assert layout.fit(8, 4) == (46, 23)  # ≥ 1024 pixels
    assert layout.fit(40, 40) == (40, 40)
    # the count follows the budgeted size: a huge photo costs what a 90×45 one does
    assert layout.token_counts([(6400, 3200)]) == [layout.num_tokens((90, 45))]


def test_token_budget_refuses_a_sample_by_name(tmp_path):
    layout = anyres(max_image_tokens=100)
    assert sum(layout.token_counts([(64, 64)])) <= 100
    with pytest.raises(BadSampleError, match=r"image_token_budget.*need \d+ visual tokens"):
        layout.token_counts([(64, 64), (64, 64)])


@pytest.mark.parametrize("size, kind", [((0, 30), "zero_sized_image"), ((1, 10_000), "extreme_aspect_ratio")])
def test_unusable_image_sizes_are_bad_samples(size, kind):
    with pytest.raises(BadSampleError, match=kind):
        anyres().token_counts([size])
    with pytest.raises(BadSampleError, match=kind):
        ImageLayout.fixed(16).token_counts([size])


def test_sizes_come_from_the_header_alone(tmp_path):
    """A file whose pixel data is cut off still gives its size (nothing is decoded), EXIF rotation applied."""
    Image.new("RGB", (300, 100), (1, 2, 3)).save(tmp_path / "a.png")
    data = (tmp_path / "a.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    assert image_size("cut.png", str(tmp_path), 10**8) == (300, 100)
    rotated = Image.new("RGB", (300, 100))
    exif = rotated.getexif()
    exif[0x0112] = 6  # rotate 90°: upright it is 100×300
    rotated.save(tmp_path / "r.jpg", exif=exif)
    assert image_size("r.jpg", str(tmp_path), 10**8) == (100, 300)


# ---- data: several images of different sizes, exact lengths, the truncation policy --------------------------
def write_data(folder: Path) -> str:
    (folder / "img").mkdir(parents=True, exist_ok=True)
    for name, size in {"wide": (64, 32), "tall": (32, 64), "sq": (40, 40), "strip": (1, 10_000)}.items():
        Image.new("RGB", size, (200, 40, 40)).save(folder / "img" / f"{name}.png")
    records = [
        {"id": "two", "image": ["img/wide.png", "img/tall.png"], "conversations": [
            {"from": "human", "value": "<image>\nCompare it with <image> please."},
            {"from": "gpt", "value": "The first is wide."}]},
        {"id": "late", "image": ["img/sq.png", "img/wide.png"], "conversations": [
            {"from": "human", "value": "<image>\nWhat is this?"}, {"from": "gpt", "value": "A square."},
            {"from": "human", "value": "And now <image>?"}, {"from": "gpt", "value": "A wide one."}]},
        {"id": "long", "image": ["img/wide.png", "img/wide.png", "img/wide.png", "img/wide.png"],
         "conversations": [{"from": "human", "value": "<image><image><image>\nAll the same?"},
                           {"from": "gpt", "value": "Yes. <image>"}]},
        {"id": "strip", "image": "img/strip.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "A line."}]},
        {"id": "mismatch", "image": ["img/sq.png"], "conversations": [
            {"from": "human", "value": "<image> and <image>"}, {"from": "gpt", "value": "Two."}]},
        {"id": "text", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}]},
    ]  # fmt: skip
    (folder / "data.json").write_text(json.dumps(records))
    return str(folder / "data.json")


def _recipe(tmp_path, max_length=200):
    data = write_data(tmp_path)
    return load_recipe(data, image_root=str(tmp_path), max_length=max_length, template="chatml")


def test_dataset_lengths_are_exact_with_images_of_different_counts(tmp_path):
    from mllm.testing.tokenizers import make_tokenizer

    layout = anyres()
    recipe = _recipe(tmp_path)
    recipe.on_bad_sample = "skip"
    ds = build_dataset(recipe, make_tokenizer("qwen2"), layout, _stack, progress=False)
    ids = [ds[i]["id"] for i in range(len(ds))]
    assert ids == ["two", "late", "text"], "'long' does not fit 200 tokens; 'strip' and 'mismatch' are bad"
    skipped = {r["id"]: r["kind"] for r in ds.skipped()}
    assert skipped == {
        "long": "images_do_not_fit",
        "strip": "extreme_aspect_ratio",
        "mismatch": "image_count_mismatch",
    }
    assert ds.lengths == [len(ds[i]["input_ids"]) for i in range(len(ds))]
    two = ds[0]
    runs = _image_runs(two["input_ids"].tolist())
    assert runs == [layout.num_tokens((64, 32)), layout.num_tokens((32, 64))] and runs[0] != runs[1]
    assert two["pixel_values"].shape[0] == 3 + 3 and two["image_sizes"].tolist() == [[64, 32], [32, 64]]
    late = ds[1]  # an image in a later turn, with another count than the first
    assert _image_runs(late["input_ids"].tolist()) == [
        layout.num_tokens((40, 40)),
        layout.num_tokens((64, 32)),
    ]
    batch = Collator(0)([ds[i] for i in range(len(ds))])
    assert batch["image_counts"].tolist() == [2, 2, 0] and batch["image_sizes"].shape == (4, 2)
    assert batch["pixel_values"].shape[0] == sum(
        layout.num_tiles(tuple(s)) for s in batch["image_sizes"].tolist()
    )


def _image_runs(ids: list[int]) -> list[int]:
    runs, n = [], 0
    for t in [*ids, 0]:
        if t == IMAGE_TOKEN_ID:
            n += 1
        elif n:
            runs, n = [*runs, n], 0
    return runs


def test_data_check_counts_samples_whose_images_do_not_fit(tmp_path):
    from mllm.testing.tokenizers import make_tokenizer

    report = check_recipe(_recipe(tmp_path), make_tokenizer("qwen2"), anyres(), progress=False)
    kinds = {b["id"]: b["kind"] for b in report.bad}
    assert kinds == {
        "long": "images_do_not_fit",
        "strip": "extreme_aspect_ratio",
        "mismatch": "image_count_mismatch",
    }
    text = report.format()
    assert "images_do_not_fit" in text and "id='long'" in text and "anyres" in text
    recipe = _recipe(tmp_path)
    recipe.on_bad_sample = "skip"
    ds = build_dataset(recipe, make_tokenizer("qwen2"), anyres(), None, progress=False)
    assert sorted(report.lengths.tolist()) == sorted(
        ds.lengths
    )  # the histogram's lengths: the training lengths


# ---- the model: one batched tower forward, the LLaVA-NeXT arrangement, a trainable newline -------------------
@pytest.fixture(scope="module")
def anyres_model(backbones):
    from mllm.config import ConnectorConfig, LLMConfig, ModelConfig, VisionConfig
    from mllm.model import build_model

    cfg = ModelConfig(
        vision=VisionConfig(path=backbones["clip"], image_aspect="anyres", max_tiles=4),
        connector=ConnectorConfig(kind="mlp"),
        llm=LLMConfig(path=backbones["llama"]),
        dtype="fp32",
    )
    torch.manual_seed(0)
    return build_model(cfg)


def test_anyres_model_trains_on_images_of_different_sizes(anyres_model, tmp_path):
    from mllm.testing.tokenizers import make_tokenizer

    model = anyres_model
    recipe = _recipe(tmp_path, max_length=400)
    recipe.on_bad_sample = "skip"
    tok = make_tokenizer("llama")
    ds = build_dataset(recipe, tok, model.image_layout, model.vision.preprocess, progress=False)
    batch = Collator(tok.pad_token_id or 0)([ds[i] for i in range(len(ds))])
    calls = []
    hook = model.vision.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    try:
        out = model(**{k: batch[k] for k in ("input_ids", "attention_mask", "labels", "pixel_values",
                                             "image_counts", "image_sizes")}, sample_ids=batch["sample_ids"])  # fmt: skip
    finally:
        hook.remove()
    assert calls == [batch["pixel_values"].shape[0]], "every tile of every image in one tower forward"
    out.loss.backward()
    assert torch.isfinite(out.loss) and model.connector.image_newline.grad.abs().sum() > 0
    model.zero_grad()
    # the same images with the sizes of other images: positions and tiles disagree → a clear error, no torch one
    wrong = batch["image_sizes"].flip(1)
    with pytest.raises(ValueError, match=r"sample .*image-token positions but its 2 image\(s\) need"):
        model(batch["input_ids"], pixel_values=batch["pixel_values"], image_counts=batch["image_counts"],
              image_sizes=wrong, sample_ids=batch["sample_ids"])  # fmt: skip


def test_connectors_without_a_grid_refuse_anyres(backbones):
    from mllm.config import ConnectorConfig, LLMConfig, ModelConfig, VisionConfig
    from mllm.model import build_model

    for kind in ("qformer", "resampler"):
        cfg = ModelConfig(
            vision=VisionConfig(path=backbones["clip"], image_aspect="anyres"),
            connector=ConnectorConfig(kind=kind, num_queries=4, num_heads=4),
            llm=LLMConfig(path=backbones["llama"]),
            dtype="fp32",
        )
        with pytest.raises(ValueError, match=f"the {kind!r} connector returns learned queries"):
            build_model(cfg)


# ---- inference: chat and eval use the same layout and budgets -------------------------------------------------
@pytest.fixture(scope="module")
def anyres_ckpt(backbones, tmp_path_factory):
    from mllm.config import ConnectorConfig, LLMConfig, ModelConfig, VisionConfig

    cfg = ModelConfig(
        vision=VisionConfig(path=backbones["clip"], image_aspect="anyres", max_tiles=4, max_image_tokens=150),
        connector=ConnectorConfig(kind="mlp"),
        llm=LLMConfig(path=backbones["llama"], mode="full"),
        dtype="fp32",
    )
    return make_checkpoint(tmp_path_factory.mktemp("anyres") / "ckpt", cfg, seed=1)


def test_chat_answers_several_images_of_different_sizes(anyres_ckpt):
    from mllm.inference import SamplingConfig, load_pretrained
    from mllm.inference.generate import generate_batch
    from mllm.inference.processor import Conversation

    model, processor = load_pretrained(anyres_ckpt)
    assert processor.layout == model.image_layout and processor.layout.aspect == "anyres"
    wide, tall = Image.new("RGB", (64, 32), (255, 0, 0)), Image.new("RGB", (32, 64), (0, 0, 255))
    convs = [
        Conversation([{"role": "user", "content": "<image> or <image>?"}], [wide, tall]),
        Conversation([{"role": "user", "content": "What is <image>?"}], [tall]),
    ]
    batch = processor(convs)
    assert batch["image_sizes"].tolist() == [[64, 32], [32, 64], [32, 64]]
    assert (batch["input_ids"] == IMAGE_TOKEN_ID).sum(1).tolist() == [
        processor.layout.num_tokens((64, 32)) + processor.layout.num_tokens((32, 64)),
        processor.layout.num_tokens((32, 64)),
    ]
    answers = generate_batch(model, processor, convs, SamplingConfig(max_new_tokens=3))
    assert len(answers) == 2
    # alone, the second conversation is answered the same: the tiles of the first never leak into it
    assert generate_batch(model, processor, convs[1:], SamplingConfig(max_new_tokens=3)) == answers[1:]
    with pytest.raises(ValueError, match=r"conversation 0: \[image_token_budget\]"):
        processor([Conversation([{"role": "user", "content": "<image><image><image>"}], [wide, wide, wide])])
    with pytest.raises(ValueError, match=r"conversation 0: \[extreme_aspect_ratio\]"):
        processor([Conversation([{"role": "user", "content": "<image>"}], [Image.new("RGB", (1, 1000))])])
    with pytest.raises(ValueError, match="2 <image> placeholder"):
        processor([Conversation([{"role": "user", "content": "<image><image>"}], [wide])])


def test_eval_answers_multi_image_samples_and_names_one_over_the_budget(anyres_ckpt, tmp_path, capsys):
    from mllm.cli import main

    data = write_data(tmp_path)
    records = [r for r in json.loads(Path(data).read_text()) if r["id"] in ("two", "late")]
    Path(data).write_text(json.dumps(records))
    out = tmp_path / "out"
    assert main(["eval", anyres_ckpt, "--data", data, "--output", str(out), "--max-new-tokens", "2"]) == 0
    assert json.loads((out / "scores.json").read_text())["n"] == 2
    records[0]["image"] = ["img/wide.png"] * 3  # 3 × 52 visual tokens > max_image_tokens=150
    records[0]["conversations"][0]["value"] = "<image><image><image>"
    Path(data).write_text(json.dumps(records))
    capsys.readouterr()
    assert main(["eval", anyres_ckpt, "--data", data, "--output", str(out)]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress bar
    assert "sample two" in last and "image_token_budget" in last


# ---- training: both stages on several images of different sizes; refused samples reported by id ------------
@pytest.mark.slow
@pytest.mark.usefixtures("one_process_group")
def test_anyres_trains_both_stages_and_reports_refused_samples(backbones, tmp_path):
    import yaml

    from mllm.checkpoint import latest_checkpoint, read_config
    from mllm.train.config import resolve_config
    from mllm.train.loop import fit, setup

    data = write_data(tmp_path / "data")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "name": "multi", "image_root": str(tmp_path / "data"), "max_length": 240, "on_bad_sample": "skip",
        "cache_dir": "none", "sources": [{"path": data}],
    }))  # fmt: skip
    base = dict(vision=backbones["clip"], llm=backbones["llama"], data=str(recipe), dtype="fp32")
    base |= dict(micro_batch_size=2, grad_accum=1, num_workers=0, save_every=0, warmup_ratio=0.0, max_steps=2)
    s1 = resolve_config(stage=1, output=str(tmp_path / "s1"), template="chatml", image_aspect="anyres",
                        max_tiles=4, **base)  # fmt: skip
    session = setup(s1)
    newline = session.model.connector.image_newline.detach().clone()
    summary = fit(session)
    assert not torch.equal(newline, session.model.connector.image_newline.detach()), "image_newline trains"
    assert summary["skipped_samples"] == 3
    skipped = [
        json.loads(line) for line in (tmp_path / "s1" / "skipped_samples.jsonl").read_text().splitlines()
    ]
    assert {r["id"]: r["kind"] for r in skipped} == {
        "long": "images_do_not_fit",
        "strip": "extreme_aspect_ratio",
        "mismatch": "image_count_mismatch",
    }
    ckpt = latest_checkpoint(tmp_path / "s1")
    assert read_config(ckpt)["model"]["vision"]["image_aspect"] == "anyres"
    s2 = resolve_config(stage=2, output=str(tmp_path / "s2"), init_from=str(ckpt), llm_mode="full",
                        template="chatml", **{k: v for k, v in base.items() if k not in ("vision", "llm")})  # fmt: skip
    session2 = setup(s2)
    assert session2.model.image_layout.aspect == "anyres", "stage 2 keeps stage 1's layout (and its newline)"
    summary2 = fit(session2)
    assert summary2["skipped_samples"] == 3 and summary2["step"] == 2


def test_data_check_and_show_cli_with_anyres(tmp_path, capsys):
    from mllm.cli import main
    from mllm.testing.tokenizers import make_tokenizer

    data = write_data(tmp_path)
    make_tokenizer("qwen2").save_pretrained(tmp_path / "tok")
    common = ["--tokenizer", str(tmp_path / "tok"), "--image-root", str(tmp_path), "--template", "chatml"]
    common += ["--image-aspect", "anyres", "--tile-size", "32", "--image-tokens", "16", "--max-length", "200"]
    out = tmp_path / "bad.jsonl"
    assert main(["data", "check", data, *common, "--no-progress", "--bad-samples", str(out)]) == 1
    text = capsys.readouterr().out
    assert "3 bad" in text and "images_do_not_fit" in text and "anyres, 16 per tile" in text
    assert {json.loads(x)["id"] for x in out.read_text().splitlines()} == {"long", "strip", "mismatch"}
    assert main(["data", "show", data, *common, "--n", "1"]) == 0
    layout = anyres()
    wide, tall = layout.num_tokens((64, 32)), layout.num_tokens((32, 64))
    shown = capsys.readouterr().out
    assert f"2 image(s) of [{wide}, {tall}] visual tokens" in shown
    assert f"<image×{wide}>" in shown and f"<image×{tall}>" in shown
