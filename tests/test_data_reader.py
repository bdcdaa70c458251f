"""`SampleReader.image_paths`: one rule for where a source's image paths start (its own image_root, else the recipe's)."""

from __future__ import annotations

import json

import pytest

from mllm.data import BadSampleError, Recipe, SourceSpec
from mllm.data.reader import open_reader
from mllm.testing.tokenizers import make_tokenizer


def write_source(path, image: str) -> str:
    record = {
        "id": "s0",
        "image": image,
        "conversations": [
            {"from": "human", "value": "<image>\nWhat is it?"},
            {"from": "gpt", "value": "A dot."},
        ],
    }
    path.write_text(json.dumps([record]))
    return str(path)


def test_a_source_root_wins_over_the_recipe_root_and_paths_stay_inside(tmp_path):
    (tmp_path / "own").mkdir()
    (tmp_path / "shared").mkdir()
    recipe = Recipe(
        image_root=str(tmp_path / "shared"),
        sources=[
            SourceSpec(write_source(tmp_path / "a.json", "x.png"), name="a"),
            SourceSpec(
                write_source(tmp_path / "b.json", "x.png"), name="b", image_root=str(tmp_path / "own")
            ),
            SourceSpec(write_source(tmp_path / "c.json", "../x.png"), name="c"),
        ],
    )
    reader = open_reader(recipe, make_tokenizer("llama"), image_tokens=2)
    paths = [reader.image_paths(reader.sample(si, 0), si) for si in (0, 1)]
    assert paths == [[str(tmp_path / "shared" / "x.png")], [str(tmp_path / "own" / "x.png")]]
    assert reader.image_paths(reader.sample(0, 0), 0, n=0) == []
    with pytest.raises(BadSampleError, match="must stay inside image_root"):
        reader.image_paths(reader.sample(2, 0), 2)
