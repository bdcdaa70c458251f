"""Every source format loads into the same samples: ShareGPT, OpenAI messages, caption pairs (JSONL/CSV/Parquet),
HF datasets saved on disk, Parquet with image bytes, and webdataset tar shards."""

from __future__ import annotations

import functools
import io
import json
import os
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from mllm.config import IMAGE_TOKEN_ID
from mllm.data import IGNORE_INDEX, BadSampleError, Collator, build_dataset, load_recipe
from mllm.data.sources import detect_format
from mllm.testing.tokenizers import make_tokenizer

HERE = os.path.join(os.path.dirname(__file__), "data")
K = 3


@functools.lru_cache
def tokenizer(family="llama"):
    return make_tokenizer(family)


def preprocess(images):
    arrays = [np.asarray(im.resize((8, 8)), dtype=np.float32) / 255 for im in images]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)


def png(color, size=(10, 10)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def supervised_text(tok, item) -> str:
    return tok.decode(item["labels"][item["labels"] != IGNORE_INDEX].tolist())


def build(path, tmp_path, **overrides):
    recipe = load_recipe(str(path), cache_dir=str(tmp_path / "cache"), **overrides)
    return build_dataset(recipe, tokenizer(), image_tokens=K, preprocess=preprocess, progress=False)


def test_sharegpt_schema(tmp_path):
    path = os.path.join(HERE, "sharegpt_sample.json")
    assert detect_format(path) == "llava"
    ds = build(path, tmp_path, template="llama3")
    item = ds[0]
    assert ds.has_image == [False] and item["pixel_values"].shape[0] == 0
    tok = tokenizer()
    assert supervised_text(tok, item) == (
        "Each player moves pieces to checkmate the other king.<|eot_id|>"
        "Jump over the other player's pieces to capture all of them.<|eot_id|>"
    )
    expected = tok(
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are a helpful assistant.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nSummarize the rules of chess in one sentence.<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n",
        add_special_tokens=False,
    )["input_ids"]
    assert item["input_ids"][: len(expected)].tolist() == expected


def test_openai_messages(tmp_path):
    root = tmp_path / "shapes"
    root.mkdir()
    (root / "circle.png").write_bytes(png("red"))
    (root / "square.png").write_bytes(png("blue"))
    path = tmp_path / "m.jsonl"
    path.write_text(open(os.path.join(HERE, "openai_messages_sample.jsonl")).read())
    assert detect_format(str(path)) == "messages"
    ds = build(path, tmp_path, template="chatml")
    tok = tokenizer()
    assert ds.has_image == [True, True, True, False]
    items = [ds[i] for i in range(4)]
    assert [it["pixel_values"].shape[0] for it in items] == [1, 2, 1, 0]
    assert [int((it["input_ids"] == IMAGE_TOKEN_ID).sum()) for it in items] == [K, 2 * K, K, 0]
    assert supervised_text(tok, items[0]) == "It is a circle.<|im_end|>"
    assert supervised_text(tok, items[2]) == "Blue.<|im_end|>"
    # the second image of msg-string is the blue square
    assert items[1]["pixel_values"][1, 2].mean() > 0.9 and items[1]["pixel_values"][1, 0].mean() < 0.1
    batch = Collator(tok.pad_token_id)(items)
    assert batch["image_counts"].tolist() == [1, 2, 1, 0] and batch["pixel_values"].shape[0] == 4


def caption_ids(tok, caption):
    return (
        [tok.bos_token_id]
        + [IMAGE_TOKEN_ID] * K
        + tok(caption, add_special_tokens=False)["input_ids"]
        + [tok.eos_token_id]
    )


@pytest.mark.parametrize("kind", ["jsonl", "csv", "parquet"])
def test_caption_pairs_with_pretraining_template(tmp_path, kind):
    (tmp_path / "a.png").write_bytes(png("red"))
    (tmp_path / "b.png").write_bytes(png("green"))
    rows = [{"image": "a.png", "caption": "a red square"}, {"image": "b.png", "caption": "a green square"}]
    path = tmp_path / f"caps.{kind}"
    if kind == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif kind == "csv":
        path.write_text("image,caption\n" + "".join(f'{r["image"]},"{r["caption"]}"\n' for r in rows))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    assert detect_format(str(path)) == {"jsonl": "captions", "csv": "captions", "parquet": "parquet"}[kind]
    ds = build(path, tmp_path, template="plain")
    tok = tokenizer()
    item = ds[1]
    assert item["input_ids"].tolist() == caption_ids(tok, "a green square")
    assert item["labels"].tolist()[: 1 + K] == [IGNORE_INDEX] * (1 + K)
    assert supervised_text(tok, item) == "a green square" + tok.eos_token
    assert item["pixel_values"].shape == (1, 3, 8, 8)
    if kind == "csv":
        assert ds.reader.sources[0].line(1) == 3


def test_hf_dataset_on_disk_with_image_feature(tmp_path):
    import datasets

    ds_hf = datasets.Dataset.from_dict(
        {
            "image": [{"bytes": png("red"), "path": None}, {"bytes": png("blue"), "path": None}],
            "text": ["a red square", "a blue square"],
        },
        features=datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")}),
    )
    datasets.DatasetDict({"train": ds_hf}).save_to_disk(str(tmp_path / "hfds"))
    assert detect_format(str(tmp_path / "hfds")) == "hf"
    recipe_file = tmp_path / "r.yaml"
    recipe_file.write_text("name: hf\ntemplate: plain\nsources:\n  - path: hfds\n    split: train\n")
    ds = build(recipe_file, tmp_path)
    tok = tokenizer()
    assert len(ds) == 2 and ds[1]["input_ids"].tolist() == caption_ids(tok, "a blue square")
    assert ds[1]["pixel_values"][0, 2].mean() > 0.9  # decoded from the stored bytes


def test_parquet_conversations_with_image_bytes(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [
        {
            "id": "p0",
            "image": png("red"),
            "conversations": [
                {"from": "human", "value": "<image>\nColor?"},
                {"from": "gpt", "value": "Red."},
            ],
        }
    ]
    (tmp_path / "shards").mkdir()
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "shards" / "part-0.parquet")
    assert detect_format(str(tmp_path / "shards")) == "parquet"
    ds = build(tmp_path / "shards", tmp_path, template="llama3")
    assert ds[0]["id"] == "p0" and supervised_text(tokenizer(), ds[0]) == "Red.<|eot_id|>"
    assert ds[0]["pixel_values"].shape == (1, 3, 8, 8)


def write_shard(path, samples):
    with tarfile.open(path, "w") as tar:
        for name, data in samples:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def wds_shards(folder, shards=2, per_shard=3) -> str:
    """`shards` tar files of `per_shard` samples: a LLaVA conversation (sample 1 of each) or a .txt caption."""
    for s in range(shards):
        samples = []
        for i in range(per_shard):
            key = f"s{s}_{i:03d}"
            samples.append((f"{key}.jpg", png(("red", "blue")[s % 2])))
            if i == 1:
                conv = {
                    "conversations": [
                        {"from": "human", "value": "<image>\nWhat?"},
                        {"from": "gpt", "value": "A square."},
                    ],
                    "question_type": "shape",
                }
                samples.append((f"{key}.json", json.dumps(conv).encode()))
            else:
                samples.append((f"{key}.txt", f"caption {s} {i}".encode()))
        write_shard(folder / f"shard-{s:04d}.tar", samples)
    return str(folder / f"shard-{{0000..{shards - 1:04d}}}.tar")


def test_webdataset_shards_are_indexed_into_the_same_dataset_and_sampler(tmp_path):
    """Shards are indexed by their tar headers into an ordinary dataset: exact lengths, random access, the
    sampler's exact per-rank split, DataLoader workers."""
    from mllm.data import MixtureBatchSampler
    from mllm.data.sources.webdataset import WebDatasetSource

    path = wds_shards(tmp_path)
    assert detect_format(path) == "webdataset"
    recipe_file = tmp_path / "r.yaml"
    recipe_file.write_text(f"name: wds\ntemplate: llama3\nsources:\n  - path: '{path}'\n")
    ds = build(recipe_file, tmp_path)
    assert [ds[i]["id"] for i in range(len(ds))] == [f"s{s}_{i:03d}" for s in range(2) for i in range(3)]
    assert all(len(ds[i]["input_ids"]) == ds.lengths[i] for i in range(len(ds)))
    assert supervised_text(tokenizer(), ds[4]) == "A square.<|eot_id|>"
    assert supervised_text(tokenizer(), ds[2]) == "caption 0 2<|eot_id|>"
    assert torch.equal(ds[3]["pixel_values"], preprocess([Image.new("RGB", (10, 10), "blue")]))
    per_rank = [
        [i for batch in MixtureBatchSampler(ds, 1, seed=0, rank=r, world_size=2) for i in batch]
        for r in (0, 1)
    ]
    assert set(per_rank[0]).isdisjoint(per_rank[1]) and sorted(per_rank[0] + per_rank[1]) == list(range(6))
    loader = torch.utils.data.DataLoader(
        ds,
        batch_sampler=MixtureBatchSampler(ds, 2, seed=0),
        num_workers=2,
        collate_fn=Collator(tokenizer().pad_token_id),
    )
    assert sorted(i for b in loader for i in b["sample_ids"]) == sorted(ds[i]["id"] for i in range(6))
    source = WebDatasetSource(load_recipe(str(recipe_file)).sources[0])
    assert source.records[1]["question_type"] == "shape" and source.records[0] == {}


def test_webdataset_bad_shards_and_samples_say_where(tmp_path):
    write_shard(tmp_path / "a.tar", [("k1.jpg", png("red")), ("k1.json", b"{oops")])
    with pytest.raises(BadSampleError, match=r"id 'k1'.*invalid_json.*k1.json.*shard .*a.tar"):
        build(tmp_path / "a.tar", tmp_path)
    with tarfile.open(tmp_path / "b.tar.gz", "w:gz") as tar:
        tar.add(tmp_path / "a.tar", arcname="k.jpg")
    os.rename(tmp_path / "b.tar.gz", tmp_path / "b.tar")
    with pytest.raises(ValueError, match="b.tar is not an uncompressed tar file.*decompress"):
        build(tmp_path / "b.tar", tmp_path)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("sources:\n  - path: 'missing-{0000..0001}.tar'\n")
    with pytest.raises(FileNotFoundError, match="shard .*missing-0000.tar does not exist"):
        build(recipe, tmp_path)


@pytest.mark.parametrize(
    "alias,name,sample", [("sharegpt", "llava", "sharegpt_sample.json"), ("openai", "messages", None)]
)
def test_format_names_users_write(tmp_path, alias, name, sample):
    """`format: sharegpt` reads the conversations (from/value) layout, `format: openai` the messages layout."""
    from mllm.data.sources import SOURCES, source_format

    if sample is None:
        (tmp_path / "m.jsonl").write_text(open(os.path.join(HERE, "openai_messages_sample.jsonl")).read())
        for shape, colour in (("circle", "red"), ("square", "blue")):
            os.makedirs(tmp_path / "shapes", exist_ok=True)
            (tmp_path / "shapes" / f"{shape}.png").write_bytes(png(colour))
        data = tmp_path / "m.jsonl"
    else:
        data = os.path.join(HERE, sample)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"sources:\n  - path: {data}\n    format: {alias}\n")
    spec = load_recipe(str(recipe)).sources[0]
    assert source_format(spec) == name and SOURCES.get(alias) is SOURCES.get(name)
    aliased, detected = build(recipe, tmp_path, template="chatml"), build(data, tmp_path, template="chatml")
    assert len(aliased) == len(detected) > 0
    assert all(torch.equal(aliased[i]["input_ids"], detected[i]["input_ids"]) for i in range(len(detected)))
    recipe.write_text(f"sources:\n  - path: {data}\n    format: vicuna\n")
    with pytest.raises(KeyError, match="known: .*sharegpt"):
        source_format(load_recipe(str(recipe)).sources[0])
