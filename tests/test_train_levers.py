"""Every speed lever of `mllm train` trains the same model: losses with the lever on equal those with it off.

One process in this process (the DeepSpeed engine, ZeRO-2 unless said), tiny real backbones, fp32, 3 steps.
The two-process ZeRO-3 run with packing and the feature cache together is the slow test at the end.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_train_runs import config, losses, write_colours

from mllm.train.batches import BlankImageRow, ExplicitMask
from mllm.train.loop import fit, setup

pytestmark = pytest.mark.usefixtures("one_process_group")

ROOT = Path(__file__).resolve().parents[1]

LOSS_TOLERANCE = dict(rtol=1e-5, atol=1e-5)
"""Lever on vs off, per step (fp32): the levers change how the same sums are laid out, not what is summed."""

ALL_OFF = dict(
    packing="off", pad_to_multiple_of=1, loss_chunk_size=0, num_workers=0, compile="off", causal_kernel=False
)
"""Every lever off: one right-padded sample per row with its padding mask, logits in one piece, no workers."""

LEVERS = {
    "packing": dict(packing="on", pack_row_tokens=160),  # several colour samples (~40 tokens) per row
    "row_rounding": dict(pad_to_multiple_of=16),
    "causal_kernel": dict(causal_kernel=True),
    "loss_chunks": dict(loss_chunk_size=3),  # fewer supervised positions per chunk than any batch has
    "workers": dict(num_workers=2, prefetch_factor=2),
    "feature_cache": dict(feature_cache="CACHE"),
}


@pytest.fixture(scope="module")
def colours_varied(tmp_path_factory) -> str:
    """The colour samples, half of them with a longer question: rows of different lengths to pack and pad."""
    import json

    folder = tmp_path_factory.mktemp("colours-varied")
    path = Path(write_colours(folder))
    records = json.loads(path.read_text())
    for r in records[::2]:
        r["conversations"][0]["value"] += " Say it in a few words, please, and be sure."
    path.write_text(json.dumps(records))
    return str(path)


def train_losses(backbones, data, output: Path, stage: int, **levers) -> list[float]:
    kw = dict(ALL_OFF, max_steps=3, micro_batch_size=4, grad_accum=1) | levers
    if kw.get("feature_cache") == "CACHE":
        kw["feature_cache"] = str(output.parent / "cache")
    if stage == 2:
        kw |= dict(llm_mode="lora", lora_r=4, lora_dropout=0.0, lr=1e-2, connector_lr=1e-2)
    summary = fit(setup(config(backbones, data, output, stage=stage, **kw)))
    assert summary["step"] == 3
    return [v for _, v in sorted(losses(output).items())]


@pytest.fixture(scope="module")
def baseline(backbones, colours_varied, tmp_path_factory):
    """Losses with every lever off, per stage (computed once)."""
    done: dict[int, list[float]] = {}

    def get(stage: int) -> list[float]:
        if stage not in done:
            done[stage] = train_losses(
                backbones, colours_varied, tmp_path_factory.mktemp("off") / "run", stage
            )
        return done[stage]

    return get


@pytest.mark.parametrize(
    "stage,lever",
    [(1, name) for name in LEVERS] + [(2, "packing"), (2, "loss_chunks"), (2, "feature_cache")],
)
def test_a_lever_on_trains_with_the_same_losses_as_off(
    backbones, colours_varied, baseline, tmp_path, stage, lever
):
    on = train_losses(backbones, colours_varied, tmp_path / "run", stage, **LEVERS[lever])
    torch.testing.assert_close(on, baseline(stage), **LOSS_TOLERANCE, msg=lambda m: f"{lever}: {m}")


def test_the_defaults_turn_the_levers_on(backbones, colours_varied, tmp_path):
    cfg = config(backbones, colours_varied, tmp_path / "run", max_steps=1, micro_batch_size=8, num_workers=1)
    assert cfg.packing == "auto" and cfg.pad_to_multiple_of == 16 and cfg.loss_chunk_size > 0
    session = setup(cfg)
    batch = session.stream.next()
    assert batch["input_ids"].shape[1] % 16 == 0
    collate = session.data.loader.collate_fn
    assert collate.pack and session.model.loss_chunk_size == cfg.loss_chunk_size
    assert (
        session.data.loader.persistent_workers and session.data.loader.prefetch_factor == cfg.prefetch_factor
    )
    session.stream.close()


def test_the_feature_cache_is_refused_for_a_training_tower(backbones, colours_varied, tmp_path):
    with pytest.raises(ValueError, match="--feature-cache serves a frozen tower"):
        config(backbones, colours_varied, tmp_path, feature_cache=str(tmp_path / "c"), train_vision=True)


def test_the_feature_cache_is_filled_once_and_its_time_counted(backbones, colours_varied, tmp_path):
    cache = tmp_path / "cache"
    first = fit(
        setup(config(backbones, colours_varied, tmp_path / "a", max_steps=1, feature_cache=str(cache)))
    )
    assert first["feature_cache_fill_s"] > 0 and first["seconds"] >= first["feature_cache_fill_s"]
    (tower,) = [d for d in cache.iterdir() if d.is_dir()]
    assert len(list(tower.glob("*/*.safetensors"))) == 8  # 8 distinct images, one entry each
    stamps = {p: p.stat().st_mtime_ns for p in tower.glob("*/*.safetensors")}
    fit(setup(config(backbones, colours_varied, tmp_path / "b", max_steps=1, feature_cache=str(cache))))
    assert {p: p.stat().st_mtime_ns for p in tower.glob("*/*.safetensors")} == stamps  # read, not recomputed
    layer = config(
        backbones,
        colours_varied,
        tmp_path / "c",
        max_steps=1,
        feature_cache=str(cache),
        vision_feature_layer=-1,
    )
    fit(setup(layer))  # another feature layer: another folder, never the first tower's features
    assert len([d for d in cache.iterdir() if d.is_dir()]) == 2


def test_a_blank_image_row_keeps_packed_rows_apart():
    batch = {
        "input_ids": torch.ones(1, 4, dtype=torch.long),
        "labels": torch.ones(1, 4, dtype=torch.long),
        "attention_mask": None,
        "position_ids": torch.tensor([[0, 1, 0, 1]]),
        "features": None,
        "image_counts": torch.zeros(1, dtype=torch.long),
    }
    out = BlankImageRow(0, 6, (5, 3), "features")(batch)
    assert out["features"].shape == (1, 5, 3) and out["input_ids"].shape == (2, 6)
    assert out["position_ids"].tolist() == [[0, 1, 0, 1, 0, 1], [0, 1, 2, 3, 4, 5]]
    mask = ExplicitMask()(out)["attention_mask"]  # [2, 1, 6, 6]: the packed samples and the new tail apart
    assert not mask[0, 0, 3, 1] and mask[0, 0, 3, 2] and not mask[0, 0, 4, 3] and mask[1, 0, 5, 0]


@pytest.mark.slow
def test_compiled_decoder_layers_train_with_the_same_losses(
    backbones, colours_varied, baseline, tmp_path, monkeypatch
):
    # a private inductor cache: a compile killed elsewhere can leave a truncated kernel in the shared one
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    on = train_losses(
        backbones, colours_varied, tmp_path / "run", 1, compile="on", packing="on", pack_row_tokens=160
    )
    torch.testing.assert_close(on, baseline(1), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="cannot run under ZeRO-3"):
        setup(
            config(
                backbones,
                colours_varied,
                tmp_path / "z3",
                compile="on",
                zero=str(ROOT / "zero_configs/z3.json"),
            )
        )


@pytest.mark.slow
def test_two_processes_zero3_with_packing_and_the_cache_match_one_process_without(
    backbones, colours_varied, tmp_path
):
    from test_train_deepspeed import launcher

    from mllm.train.progress import read_metrics

    script = str(ROOT / "scripts" / "finetune.py")
    common = ["--vision", backbones["clip"], "--llm", backbones["llama"], "--data", colours_varied]
    common += [
        "--dtype",
        "fp32",
        "--llm-mode",
        "lora",
        "--lora-r",
        "4",
        "--lora-dropout",
        "0",
        "--lr",
        "1e-2",
    ]
    common += ["--connector-lr", "1e-2", "--micro-batch-size", "2", "--max-steps", "3", "--seed", "5"]
    common += ["--warmup-ratio", "0", "--num-workers", "1"]
    on = ["--packing", "on", "--pack-row-tokens", "160", "--feature-cache", str(tmp_path / "cache")]
    z3 = [
        "--zero",
        str(ROOT / "zero_configs" / "z3.json"),
        "--grad-accum",
        "1",
        "--output",
        str(tmp_path / "z3"),
    ]
    port = str(29750 + os.getpid() % 200)
    off = [
        "--packing",
        "off",
        "--pad-to-multiple-of",
        "1",
        "--loss-chunk-size",
        "0",
        "--causal-kernel",
        "false",
    ]
    one = ["--grad-accum", "2", "--output", str(tmp_path / "one")]
    env = {
        k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT")
    }
    for cmd in (
        launcher() + ["--num_gpus", "2", "--master_port", port, script] + common + on + z3,
        [sys.executable, script] + common + off + one,
    ):
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    got, want = ([r["loss"] for r in read_metrics(tmp_path / name)] for name in ("z3", "one"))
    torch.testing.assert_close(got, want, **LOSS_TOLERANCE)
