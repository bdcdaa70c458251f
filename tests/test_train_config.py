"""Run config: options derived from the dataclass, presets ← YAML ← command line, checks, DeepSpeed "auto" filling."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import pytest

from mllm.train import distributed as dist
from mllm.train.config import STAGE_PRESETS, TrainConfig, add_config_arguments, field_docs, resolve_config
from mllm.train.optim import lr_multiplier

ROOT = Path(__file__).resolve().parents[1]
ISSUE_OPTIONS = (
    "--vision --llm --connector --data --output --max-steps --epochs --micro-batch-size --grad-accum --lr --seed "
    "--save-every --resume --init-from --llm-mode --zero --keep-last --warmup-ratio --schedule --grad-clip "
    "--grad-checkpointing --dtype"
).split()


def parser(include_stage: bool = False) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    add_config_arguments(p, include_stage=include_stage)
    return p


def test_every_field_is_an_option_with_its_docstring_as_help():
    p = parser(include_stage=True)
    flags = {a.option_strings[0]: a for a in p._actions if a.option_strings}
    for f in dataclasses.fields(TrainConfig):
        action = flags["--" + f.name.replace("_", "-")]
        assert action.help and action.help == field_docs()[f.name]
    for option in ISSUE_OPTIONS:
        assert option in flags, option


def test_preset_then_yaml_then_command_line(tmp_path):
    (tmp_path / "run.yaml").write_text(
        "lr: 0.5\nmicro-batch-size: 3\nseed: 7\nlora_target_modules: [q_proj, v_proj]\n"
    )
    args = parser().parse_args(
        ["--config", str(tmp_path / "run.yaml"), "--seed", "9", "--llm-mode", "qlora", "--resume"]
    )
    cfg = resolve_config(args, stage=2)
    assert (cfg.lr, cfg.micro_batch_size, cfg.seed, cfg.llm_mode) == (0.5, 3, 9, "qlora")
    assert cfg.connector_lr == STAGE_PRESETS[2]["connector_lr"] and cfg.resume == "latest"
    assert cfg.lora_target_modules == ["q_proj", "v_proj"]
    assert cfg.model_config().llm.lora.target_modules == ["q_proj", "v_proj"]
    stage1 = resolve_config(parser().parse_args(["--grad-checkpointing", "--schedule", "linear"]), stage=1)
    assert (stage1.lr, stage1.llm_mode, stage1.global_batch_size, stage1.warmup_ratio) == (
        1e-3,
        "frozen",
        256,
        0.03,
    )
    assert stage1.grad_checkpointing and stage1.schedule == "linear"
    assert stage1.model_config().llm.lora.target_modules == "all-linear"


@pytest.mark.parametrize(
    "yaml_text, overrides, message",
    [
        ("lr: 1\nlearning_rate: 2\n", {}, "unknown run settings \\['learning_rate'\\]"),
        ("stage: 2\n", {}, "is a stage-2 config but this is a stage-1 run"),
        ("", {"llm_mode": "lora"}, "stage 1 trains only the connector"),
        ("", {"dtype": "fp16"}, "fp16 needs loss scaling"),
        ("", {"warmup_ratio": 1.5}, "warmup_ratio must be in"),
        ("", {"attention": "flash"}, "attention must be auto\\|eager"),
        ("", {"connector_width": 100, "connector_heads": 8}, "divisible by connector_heads \\(8\\)"),
        ("- a\n- b\n", {}, "must be a mapping"),
    ],
)
def test_bad_settings_are_named(tmp_path, yaml_text, overrides, message):
    (tmp_path / "run.yaml").write_text(yaml_text)
    args = parser().parse_args(["--config", str(tmp_path / "run.yaml")])
    with pytest.raises(ValueError, match=message):
        resolve_config(args, stage=1, **overrides)


def test_missing_essentials_are_listed():
    with pytest.raises(ValueError, match="missing --vision, --llm, --data, --output"):
        TrainConfig().check_complete()


@pytest.mark.parametrize("name, stage", [("z2.json", 2), ("z3.json", 3), ("z3_offload.json", 3)])
def test_shipped_zero_configs_fill_every_auto(name, stage):
    cfg = TrainConfig(zero=str(ROOT / "zero_configs" / name), micro_batch_size=4, grad_clip=0.5)
    raw = dist.read_ds_config(cfg)
    assert "auto" in json.dumps(raw)
    ds = dist.fill_ds_config(raw, cfg, grad_accum=3, world_size=2, bf16=True, hidden_size=64)
    assert "auto" not in json.dumps(ds)
    assert (
        ds["train_micro_batch_size_per_gpu"],
        ds["gradient_accumulation_steps"],
        ds["train_batch_size"],
    ) == (4, 3, 24)
    assert ds["gradient_clipping"] == 0.5 and ds["bf16"]["enabled"] is True
    assert dist.zero_stage(ds) == stage
    assert dist.offloads_optimizer(ds) == (name == "z3_offload.json")


def test_zero_config_conflicts_are_refused(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"train_micro_batch_size_per_gpu": 8, "zero_optimization": {"stage": 2}}))
    cfg = TrainConfig(zero=str(path), micro_batch_size=4)
    with pytest.raises(ValueError, match="train_micro_batch_size_per_gpu=8 but the run needs 4"):
        dist.fill_ds_config(dist.read_ds_config(cfg), cfg, 1, 1, False, 8)
    path.write_text(json.dumps({"zero_optimization": {"stage": 3, "sub_group_size": "auto"}}))
    with pytest.raises(ValueError, match="zero_optimization.sub_group_size"):
        dist.fill_ds_config(dist.read_ds_config(TrainConfig(zero=str(path))), TrainConfig(), 1, 1, False, 8)
    path.write_text("{ not json")
    with pytest.raises(ValueError, match="not valid JSON \\(line 1"):
        dist.read_ds_config(TrainConfig(zero=str(path)))


def test_schedules_warm_up_then_decay():
    total, warmup = 100, 3
    cosine = [lr_multiplier(s, total, warmup, "cosine") for s in range(total)]
    assert cosine[:3] == [0.25, 0.5, 0.75] and cosine[3] == 1.0
    assert all(a >= b for a, b in zip(cosine[3:], cosine[4:], strict=False)) and cosine[-1] < 0.01
    linear = [lr_multiplier(s, total, warmup, "linear") for s in range(total)]
    assert linear[3] == 1.0 and abs(linear[50] - (1 - 47 / 97)) < 1e-12
    assert lr_multiplier(90, total, warmup, "constant") == 1.0


def test_qlora_under_zero3_is_refused_with_the_way_out():
    ds = dist.read_ds_config(TrainConfig(zero=str(ROOT / "zero_configs" / "z3.json")))
    with pytest.raises(ValueError, match="qlora cannot run under ZeRO-3.*z2.json"):
        dist.check_supported("qlora", ds)
    dist.check_supported("lora", ds)
    dist.check_supported(
        "qlora", dist.read_ds_config(TrainConfig(zero=str(ROOT / "zero_configs" / "z2.json")))
    )


def test_mllm_train_reports_bad_options_in_one_line(capsys):
    from mllm.cli import main

    assert main(["train", "--stage", "1", "--llm-mode", "frozen", "--output", "x"]) == 2
    err = capsys.readouterr().err.strip()
    assert (
        err
        == "mllm train: error: missing --vision, --llm, --data (set them on the command line or in the YAML config)"
    )


def test_one_set_of_lora_defaults():
    """The run config's LoRA options default to the model config's `LoraSettings` (LLaVA-1.5's r 128, alpha 256):
    a run given no LoRA option trains the adapter a `ModelConfig` built without one describes."""
    from mllm.config import LLMConfig, LoraSettings

    assert TrainConfig(stage=2, llm_mode="lora").model_config().llm.lora == LLMConfig().lora == LoraSettings()
    assert (LoraSettings().r, LoraSettings().alpha) == (128, 256)
    preset = resolve_config(stage=2, vision="v", llm="l", data="d", output="o")
    assert (preset.lora_r, preset.lora_alpha, preset.lora_dropout) == (128, 256, 0.05)
