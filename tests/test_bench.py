"""The side-by-side bench: FLOP formula, metering, and one tiny end-to-end run of scripts/bench.py (schema, not speed)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from mllm.bench.flops import ModelSizes, model_sizes, sample_flops
from mllm.bench.meter import StepMeter
from mllm.bench.ours import Levers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_flop_formula_by_hand():
    s = ModelSizes(
        n_llm=1000,
        llm_layers=2,
        llm_width=8,
        n_proj=50,
        n_vis=300,
        vis_layers=3,
        vis_width=4,
        vis_tokens=5,
        image_tokens=4,
    )
    t, i = 20, 1
    vision = 2 * 300 * 5 + 4 * 3 * 4 * 5**2
    attention = 12 * 2 * 8 * t**2
    assert sample_flops(s, t, i, llm_trained=True) == 6 * 1000 * t + attention + 6 * 50 * 4 + vision
    assert sample_flops(s, t, i, llm_trained=False) == 4 * 1000 * t + attention + 6 * 50 * 4 + vision
    assert (
        sample_flops(s, t, 0, llm_trained=True) == 6 * 1000 * t + attention
    )  # text-only: no tower, no projector


def test_model_sizes_match_the_loaded_models(backbones):
    from transformers import AutoModelForCausalLM, CLIPVisionModel

    sizes = model_sizes(backbones["clip"], backbones["llama"])
    llm = AutoModelForCausalLM.from_pretrained(backbones["llama"])
    vis = CLIPVisionModel.from_pretrained(backbones["clip"])
    body = sum(p.numel() for p in llm.model.layers.parameters()) + llm.model.norm.weight.numel()
    assert llm.config.tie_word_embeddings  # the head is counted although it shares the embedding matrix
    assert sizes.n_llm == body + llm.config.vocab_size * llm.config.hidden_size
    emb = vis.embeddings if hasattr(vis, "embeddings") else vis.vision_model.embeddings
    assert (
        sizes.n_vis
        == sum(p.numel() for p in vis.parameters())
        - emb.position_embedding.weight.numel()
        - emb.class_embedding.numel()
    )
    assert sizes.image_tokens == (32 // 8) ** 2 and sizes.vis_tokens == sizes.image_tokens + 1


def test_step_meter_times_only_after_warmup():
    m = StepMeter(warmup=2)
    for step in range(5):
        m.batch([10 + step, 5], [1, 0], slots=2 * (10 + step), supervised=3)
        m.step_end(loss=1.0)
    r = m.result()
    assert r["timed_steps"] == 3 and r["samples"] == 6
    assert r["real_tokens"] == sum(10 + s + 5 for s in (2, 3, 4))
    assert r["padding_share"] == pytest.approx(1 - r["real_tokens"] / sum(2 * (10 + s) for s in (2, 3, 4)))
    assert r["lengths"] == [12, 5, 13, 5, 14, 5] and r["images"] == [1, 0] * 3
    with pytest.raises(RuntimeError, match="no timed steps"):
        StepMeter(warmup=3).result()


def test_levers_are_documented():
    assert Levers.names() == [
        "supervised_head",
        "packing",
        "causal_kernel",
        "length_grouping",
        "few_shapes",
        "feature_cache",
        "workers",
        "compile",
    ]
    assert all(Levers.describe(n) != n for n in Levers.names())


@pytest.mark.slow
def test_bench_end_to_end_on_tiny_work(tmp_path):
    from mllm.bench.tiny_work import make_tiny_work

    work = make_tiny_work(str(tmp_path / "work"), samples=16)
    out = tmp_path / "result.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [
        sys.executable,
        os.path.join(ROOT, "scripts", "bench.py"),
        "--work",
        work,
        "--stage",
        "2",
        "--steps",
        "2",
        "--warmup",
        "1",
        "--peak-seconds",
        "0.02",
        "--disable",
        "compile",
        "--output",
        str(out),
    ]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "verdict: samples/s ratio" in proc.stdout and "FLOPs/sample" in proc.stdout
    result = json.loads(out.read_text())
    assert {
        "stage",
        "machine",
        "flop_formula",
        "model_sizes",
        "reference",
        "mllm",
        "ratio",
        "verdict",
        "levers",
    } <= set(result)
    for side in ("reference", "mllm"):
        r = result[side]
        for key in (
            "samples_per_s",
            "real_tokens_per_s",
            "padding_share",
            "peak_rss_mb",
            "mfu",
            "timed_steps",
        ):
            assert isinstance(r[key], (int, float)), (side, key)
        assert (
            r["timed_steps"] == 2 and r["samples_per_s"] > 0 and 0 <= r["padding_share"] < 1 and r["mfu"] > 0
        )
    assert result["mllm"]["settings"]["levers"] == {n: n != "compile" for n in Levers.names()}
    assert result["mllm"]["settings"]["feature_cache"] is True
    assert result["mllm"]["settings"]["cache_filled_images"] > 0  # a fresh cache, filled by a child process
    assert result["ratio"]["samples_per_s"] == pytest.approx(
        result["mllm"]["samples_per_s"] / result["reference"]["samples_per_s"]
    )
    assert result["machine"]["peak_flops"] > 0 and torch.get_num_threads() >= 1
