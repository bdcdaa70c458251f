"""Two-process runs through the `deepspeed` launcher (gloo on CPU): ZeRO-3, ZeRO-2 and ZeRO-3 with CPU offload
train the same LoRA adapters and connector, equal to one process accumulating the same global batch."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mllm.checkpoint import latest_checkpoint, load_model_and_config

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def write_colours(folder: Path) -> str:
    from test_train_runs import write_colours as write

    return write(folder)


def launcher() -> list[str]:
    beside = Path(sys.executable).with_name("deepspeed")
    return [str(beside)] if beside.is_file() else [shutil.which("deepspeed") or "deepspeed"]


def run(cmd: list[str], out: Path) -> None:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_SIZE", "MASTER_PORT")
    }
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    assert latest_checkpoint(out) is not None


def trained_tensors(out: Path) -> dict[str, torch.Tensor]:
    ckpt = latest_checkpoint(out)
    tensors = {f"connector.{k}": v for k, v in load_file(str(ckpt / "connector.safetensors")).items()}
    tensors |= {
        f"adapter.{k}": v for k, v in load_file(str(ckpt / "adapter" / "adapter_model.safetensors")).items()
    }
    return tensors


def losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_zero3_zero2_offload_and_one_process_train_the_same_weights(backbones, tmp_path):
    data = write_colours(tmp_path / "data")
    common = ["--vision", backbones["clip"], "--llm", backbones["llama"], "--data", data, "--dtype", "fp32"]
    common += [
        "--llm-mode",
        "lora",
        "--lora-r",
        "4",
        "--lora-dropout",
        "0",
        "--lr",
        "1e-2",
        "--connector-lr",
        "1e-2",
    ]
    common += [
        "--micro-batch-size",
        "2",
        "--max-steps",
        "3",
        "--num-workers",
        "0",
        "--seed",
        "5",
        "--warmup-ratio",
        "0",
    ]
    script = str(ROOT / "scripts" / "finetune.py")
    outs = {}
    for i, zero in enumerate(("z3", "z2", "z3_offload")):
        outs[zero] = tmp_path / zero
        cmd = launcher() + ["--num_gpus", "2", "--master_port", str(29650 + i + os.getpid() % 200), script]
        run(
            cmd
            + common
            + [
                "--grad-accum",
                "1",
                "--zero",
                str(ROOT / "zero_configs" / f"{zero}.json"),
                "--output",
                str(outs[zero]),
            ],
            outs[zero],
        )
    # one process, no launcher, accumulating the same 2 micro-batches per step; and the other batch layout:
    # rows rounded up to 16 tokens with an explicit padding mask (the launcher runs: no rounding, no mask)
    outs["one"] = tmp_path / "one"
    layout = ["--pad-to-multiple-of", "16", "--causal-kernel", "false"]
    run(
        [sys.executable, script] + common + layout + ["--grad-accum", "2", "--output", str(outs["one"])],
        outs["one"],
    )

    reference = trained_tensors(outs["z3"])
    assert reference and all(t.numel() > 0 for t in reference.values())
    assert any(k.startswith("adapter.") and "lora_B" in k and t.abs().sum() > 0 for k, t in reference.items())
    for name in ("z2", "z3_offload", "one"):
        other = trained_tensors(outs[name])
        assert other.keys() == reference.keys(), name
        for k in reference:
            assert other[k].numel() > 0 and torch.allclose(other[k], reference[k], atol=1e-5, rtol=1e-4), (
                name,
                k,
            )
        assert max(abs(a - b) for a, b in zip(losses(outs[name]), losses(outs["z3"]), strict=True)) < 1e-4, (
            name
        )
    ckpt = latest_checkpoint(outs["z3"])
    assert sorted(p.name for p in ckpt.glob("rank*_state.pt")) == ["rank0_state.pt", "rank1_state.pt"]
    model, saved = load_model_and_config(outs["z3"])  # written under ZeRO-3, read without DeepSpeed
    assert saved["run"]["zero"].endswith("z3.json") and saved["model"]["llm"]["mode"] == "lora"


def test_a_lock_left_by_a_killed_load_does_not_hang_the_next_run():
    """torch's build-folder lock file outlives a SIGKILLed holder; the next run must clear it, not wait forever."""
    from deepspeed.accelerator import get_accelerator
    from torch.utils import cpp_extension

    load = [
        sys.executable,
        "-c",
        "from mllm.train.distributed import load_deepspeed_op as f; f('ShareMemCommBuilder')",
    ]
    subprocess.run(load, check=True, capture_output=True, timeout=600)  # built once (install.sh already did)
    name = get_accelerator().create_op_builder("ShareMemCommBuilder").name
    stale = Path(cpp_extension._get_build_directory(name, verbose=False)) / "lock"
    stale.touch()
    try:
        proc = subprocess.run(load, capture_output=True, text=True, timeout=120)
    finally:
        left = stale.exists()
        stale.unlink(missing_ok=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "removing" in proc.stdout and not left
