"""The side-by-side bench: FLOP formula, metering, both sides training the same parts, the round statistics, and
one tiny end-to-end run of `scripts/bench.py --quick` (schema, not speed)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from mllm.bench.flops import ModelSizes, model_sizes, sample_flops
from mllm.bench.meter import StepMeter, peak_rss_mb
from mllm.bench.product import MeteredStream, batch_samples, parse_settings
from mllm.bench.reference import ReferenceSettings, fastest_settings
from mllm.bench.report import merge_ranks, ratios, row_verdict, summarise
from mllm.bench.rows import ROWS, RSS_TARGET

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


def test_peak_rss_is_the_process_own_not_its_parents():
    # ru_maxrss survives exec on Linux: a side launched by a big parent would report the parent's size
    ballast = bytearray(400 * 2**20)  # touched: 400 MiB resident in this process
    code = "from mllm.bench.meter import peak_rss_mb; print(peak_rss_mb())"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert float(out.stdout) < 300, out.stdout
    assert len(ballast) and peak_rss_mb() > 400


def test_batch_samples_counts_real_samples_only():
    pad = 0
    ids = torch.tensor(
        [[5, 6, 7, 0, 0, 0], [8, 0, 9, 9, 9, 4], [3, 0, 0, 0, 0, 0]]
    )  # row 2: a pad-valued token
    batch = {
        "input_ids": ids,
        "attention_mask": None,  # mask-free: lengths run up to the right padding
        "labels": torch.full_like(ids, -100),
        "image_counts": torch.tensor([1, 0, 1]),
        "sample_ids": ["a", "b"],  # the third row is BlankImageRow's, no sample
    }
    assert batch_samples(batch, pad) == ([3, 6], [1, 0])
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 0], [1, 0, 0, 0, 0, 0]])
    assert batch_samples({**batch, "attention_mask": mask}, pad) == ([4, 5], [1, 0])  # a mask says it all
    packed = {**batch, "sample_lengths": [3, 2, 4], "sample_images": [1, 1, 0]}
    assert batch_samples(packed, pad) == ([3, 2, 4], [1, 1, 0])


def test_metered_stream_hands_on_the_same_batches():
    class Stream:
        epoch_progress = 0.25

        def __init__(self):
            self.batches = [
                {
                    "input_ids": torch.tensor([[4, 5, 6, 1]]),
                    "attention_mask": None,
                    "labels": torch.tensor([[-100, -100, 6, 1]]),
                    "image_counts": torch.tensor([0]),
                    "sample_ids": [str(i)],
                }
                for i in range(3)
            ]

        def next(self):
            return self.batches.pop(0)

    inner, meter = Stream(), StepMeter(warmup=1)
    expected = list(inner.batches)
    stream = MeteredStream(inner, meter, pad_token_id=0)
    for want in expected:
        assert stream.next() is want
        meter.step_end(1.0)
    r = meter.result()
    assert (
        r["timed_steps"] == 2 and r["samples"] == 2 and r["real_tokens"] == 8 and r["supervised_tokens"] == 4
    )
    assert stream.epoch_progress == 0.25


def test_mllm_settings_are_parsed_as_mllm_train_parses_them():
    assert parse_settings(["num_workers=1", "pad_to_multiple_of=16", "causal_kernel=false"]) == {
        "num_workers": 1,
        "pad_to_multiple_of": 16,
        "causal_kernel": False,
    }
    with pytest.raises(ValueError, match="not a valid"):
        parse_settings(["no_such_option=1"])
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_settings(["num_workers"])


def test_reference_settings_parse():
    s = ReferenceSettings.parse("attention=eager,workers=2,compile=on")
    assert s == ReferenceSettings("eager", 2, True)
    assert ReferenceSettings.parse("") == ReferenceSettings()
    with pytest.raises(ValueError, match="unknown key"):
        ReferenceSettings.parse("threads=2")


def _side(samples, elapsed, rss, rank=0, lengths=None):
    lengths = lengths or [10] * samples
    return {
        "rank": rank,
        "samples": samples,
        "real_tokens": sum(lengths),
        "supervised_tokens": samples,
        "peak_rss_mb": rss,
        "worker_peak_rss_mb": 100.0,
        "cpu_s": 1.0,
        "worker_cpu_s": 0.0,
        "elapsed_s": elapsed,
        "setup_s": 2.0 + rank,
        "samples_per_s": samples / elapsed,
        "real_tokens_per_s": sum(lengths) / elapsed,
        "padding_share": 0.5,
        "lengths": lengths,
        "images": [1] * samples,
        "dataset_samples": 100,
    }


def test_ranks_merge_into_one_side():
    merged = merge_ranks([_side(8, 4.0, 500.0, rank=1), _side(8, 2.0, 600.0, rank=0)])
    assert merged["samples"] == 16 and merged["peak_rss_mb"] == 1100.0
    assert merged["elapsed_s"] == 4.0 and merged["samples_per_s"] == 4.0  # the slowest process sets the pace
    assert merged["setup_s"] == 3.0 and merged["padding_share"] == pytest.approx(0.5)
    assert len(merged["lengths"]) == 16 and merged["ranks"] == 2
    assert merge_ranks([_side(8, 4.0, 500.0)])["samples"] == 8


def test_rounds_give_median_spread_and_verdict():
    sizes = ModelSizes(1000, 2, 8, 50, 300, 3, 4, 5, 4)
    summary = lambda raw: summarise(raw, sizes, 1e9, llm_trained=True)  # noqa: E731
    rounds = []
    for ref_speed, ours_speed, ours_rss in ((4.0, 7.2, 800.0), (4.0, 10.0, 1000.0), (5.0, 5.0, 850.0)):
        ref, ours = summary(_side(8, 8 / ref_speed, 1000.0)), summary(_side(8, 8 / ours_speed, ours_rss))
        rounds.append({"reference": ref, "mllm": ours, "ratio": ratios(ours, ref)})
    v = row_verdict("full", rounds)
    assert v["ratio"]["samples_per_s"] == pytest.approx({"median": 1.8, "min": 1.0, "max": 2.5, "n": 3})
    assert v["ratio"]["peak_rss"]["median"] == pytest.approx(0.85)
    assert v["speed_met"] and v["rss_met"] and v["met"]  # full: >= 1.5x, RSS <= 0.9x
    assert not row_verdict("stage1", rounds)["speed_met"]  # stage 1 needs 2.0x
    assert ROWS["stage1"].target == 2.0 and ROWS["lora"].target == 1.5 and RSS_TARGET == 0.9


@pytest.mark.parametrize("row", list(ROWS))
def test_both_sides_train_the_same_parameters(tmp_path, row):
    """Each row trains the same parts on both sides: same trainable parameter count, LoRA with mllm's settings."""
    from mllm.bench.product import train_config
    from mllm.bench.reference import build_llava, set_trainability
    from mllm.bench.tiny_work import make_tiny_work
    from mllm.bench.work import Work, write_recipe
    from mllm.model import build_model

    work = Work(make_tiny_work(str(tmp_path / "work"), samples=4))
    cfg = train_config(
        work, ROWS[row], write_recipe(work, ROWS[row].stage, str(tmp_path)), str(tmp_path / "o"), 2, 2, "fp32"
    )
    mllm = build_model(cfg.model_config())
    llava, *_ = build_llava(work, torch.float32, cfg.model_config().llm)
    set_trainability(llava, cfg.llm_mode)
    count = lambda m: sum(p.numel() for p in m.parameters() if p.requires_grad)  # noqa: E731
    assert count(mllm) == count(llava) > 0
    if row == "lora":
        lora = [m for m in llava.modules() if type(m).__name__ == "Linear" and hasattr(m, "lora_A")]
        assert lora and lora[0].r["default"] == cfg.lora_r and lora[0].lora_alpha["default"] == cfg.lora_alpha
        assert not any(hasattr(m, "lora_A") for m in llava.model.multi_modal_projector.modules())


@pytest.mark.slow
def test_bench_quick_runs_mllm_train_against_the_reference(tmp_path):
    out = tmp_path / "result.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    # one row: every row runs the same two sides (the LoRA row's settings are checked above without a run)
    cmd = [sys.executable, os.path.join(ROOT, "scripts", "bench.py"), "--quick", "--rows", "stage1"]
    proc = subprocess.run(
        cmd + ["--output", str(out)], env=env, cwd=ROOT, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "samples/s mllm / reference: median" in proc.stdout and "verdict:" in proc.stdout
    result = json.loads(out.read_text())
    assert set(result["rows"]) == {"stage1"} and result["rounds"] == 1
    for name, row in result["rows"].items():
        (rd,) = row["rounds"]
        for side in ("reference", "mllm"):
            r = rd[side]
            assert r["timed_steps"] == 2 and r["samples"] > 0 and r["mfu"] > 0 and r["peak_rss_mb"] > 0, (
                name,
                side,
            )
        mllm = rd["mllm"]["settings"]
        assert mllm["trainer"].startswith("mllm.train.loop") and mllm["zero_stage"] == 2
        assert mllm["run_config"]["llm_mode"] == row["llm_mode"] and mllm["run_config"]["max_steps"] == 3
        assert rd["reference"]["settings"]["llm_mode"] == row["llm_mode"]
        assert rd["reference"]["settings"]["trainable_params"] == mllm["trainable_params"]
        assert rd["ratio"]["samples_per_s"] == pytest.approx(
            rd["mllm"]["samples_per_s"] / rd["reference"]["samples_per_s"]
        )
        assert row["verdict"]["ratio"]["samples_per_s"]["n"] == 1


def test_reference_keeps_the_fastest_settings():
    speeds = {(w, "sdpa", False): s for w, s in ((0, 5.0), (1, 7.0), (2, 6.0))}
    speeds[(1, "eager", False)] = 8.0
    speeds[(1, "eager", True)] = 7.5  # compile tried on top of the best so far: slower, dropped
    speeds[(1, "sdpa", True)] = 9.0
    best, tried = fastest_settings(lambda s: speeds[(s.workers, s.attention, s.compile)])
    assert best == ReferenceSettings("eager", 1, False)
    assert [t["settings"]["workers"] for t in tried] == [0, 1, 2, 1, 1] and len(tried) == 5
    assert ReferenceSettings.parse(best.text()) == best
