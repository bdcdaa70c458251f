"""`mllm eval --task alignment`: the Modality Integration Rate of any connector's checkpoint, and its distance."""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers import make_checkpoint, make_image

from mllm.model.alignment import frechet_distance, replace_outliers


def test_frechet_distance_of_known_gaussians():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(4000, 3, generator=g)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    shifted = a + torch.tensor([2.0, 0.0, 0.0])  # same covariance, mean 2 away: distance 4
    assert frechet_distance(a, shifted) == pytest.approx(4.0, rel=1e-6)
    wide = torch.randn(4000, 3, generator=g) * 3  # covariance 9·I vs I: 3·(1 + 9 − 2·3) = 12
    assert frechet_distance(a, wide) == pytest.approx(12.0, rel=0.1)


def test_outliers_become_the_median_row():
    x = torch.ones(100, 4)
    x[7] = 1000.0
    assert torch.equal(replace_outliers(x), torch.ones(100, 4))


@pytest.mark.parametrize("connector", ["mlp", "qformer"])
def test_alignment_task_scores_every_layer(connector, tiny_config, tmp_path, capsys):
    from mllm.cli import main

    ckpt = make_checkpoint(tmp_path / "ckpt", tiny_config(connector=connector), seed=1)
    (tmp_path / "img").mkdir()
    records = []
    for i in range(4):
        make_image(i).save(tmp_path / "img" / f"{i}.png")
        conv = [
            {"from": "human", "value": "<image>\nDescribe."},
            {"from": "gpt", "value": f"shape number {i}"},
        ]
        records.append({"id": str(i), "image": f"img/{i}.png", "conversations": conv})
    (tmp_path / "data.json").write_text(json.dumps(records))
    argv = [
        "eval",
        ckpt,
        "--data",
        str(tmp_path / "data.json"),
        "--task",
        "alignment",
        "--output",
        str(tmp_path / "out"),
    ]
    assert main([*argv, "--batch-size", "3", "--no-progress"]) == 0
    scores = json.loads((tmp_path / "out" / "scores.json").read_text())
    assert len(scores["per_layer"]) == 2  # the tiny llama's decoder layers
    assert all(d > 0 and math.isfinite(d) for d in scores["per_layer"])
    assert scores["mir"] == pytest.approx(math.log10(sum(scores["per_layer"])))
    visual_tokens = {"mlp": 16, "qformer": 4}[connector]  # the tiny CLIP's 16 patches; 4 queries
    assert scores["n_visual"] == 4 * visual_tokens and scores["n_text"] > 0
    assert "Modality Integration Rate" in capsys.readouterr().out
