"""Resource faults: an unwritable output directory or a disk too small for a checkpoint stops the run before its
first step with a clear message; SIGTERM (a scheduler's preemption notice) saves a checkpoint and exits cleanly."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch

from mllm.checkpoint import latest_checkpoint, verify
from mllm.train.config import resolve_config
from mllm.train.loop import setup
from mllm.train.preflight import checkpoint_bytes
from mllm.train.stop import STOPPED_EXIT_CODE

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def colours(tmp_path_factory) -> str:
    from test_train_runs import write_colours

    return write_colours(tmp_path_factory.mktemp("colours"))


pytestmark = pytest.mark.usefixtures("one_process_group")


def config(backbones, data, output, stage=1, **kw):
    base = dict(vision=backbones["clip"], llm=backbones["llama"], data=data, output=str(output), dtype="fp32")
    base |= dict(micro_batch_size=2, grad_accum=1, num_workers=0, warmup_ratio=0.0, seed=3, template="plain")
    return resolve_config(stage=stage, **{**base, **kw})


def unwritable_outputs(tmp_path: Path) -> list[Path]:
    (tmp_path / "a_file").write_text("not a directory")
    outputs = [
        tmp_path / "a_file" / "run",
        Path("/proc/mllm-run"),
    ]  # procfs refuses new entries, even to root
    if os.geteuid() != 0:  # permission bits do not stop root
        (tmp_path / "read_only").mkdir()
        (tmp_path / "read_only").chmod(0o555)
        outputs.append(tmp_path / "read_only" / "run")
    return outputs


def test_unwritable_output_stops_before_anything_loads(backbones, colours, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    for output in unwritable_outputs(tmp_path):
        with pytest.raises(ValueError, match=f"--output {output}: cannot write there .*writable directory"):
            setup(config(backbones, colours, output, max_steps=2))
    assert "runtime:" not in caplog.text  # build_model logs this first thing: no model was loaded


def test_unwritable_output_is_one_line_from_the_script(backbones, colours, tmp_path):
    (tmp_path / "a_file").write_text("")
    cmd = [sys.executable, str(ROOT / "scripts" / "pretrain.py"), "--vision", backbones["clip"], "--llm"]
    cmd += [backbones["llama"], "--data", colours, "--output", str(tmp_path / "a_file" / "run")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=launcher_free_env())
    assert proc.returncode == 2
    assert "pretrain.py: error: --output" in proc.stderr and "Not a directory" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_too_little_disk_stops_before_the_first_step(backbones, colours, tmp_path, monkeypatch):
    out = tmp_path / "run"
    real = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(
        shutil,
        "disk_usage",
        lambda path: types.SimpleNamespace(total=real.total, used=real.total, free=50_000),
    )
    with pytest.raises(
        ValueError,
        match=r"--output .*: 48\.8 KiB free on its disk, but this run needs about .* MiB for 2 checkpoint",
    ):
        setup(config(backbones, colours, out, max_steps=4, save_every=2, keep_last=2))
    assert not (out / "metrics.jsonl").exists() and not list(out.glob("checkpoint-*"))
    # (keep_last 2, saves at steps 2 and 4: both exist at the end.) Keeping all: room for every one up front
    monkeypatch.setattr(
        shutil, "disk_usage", lambda path: types.SimpleNamespace(total=real.total, used=0, free=5 << 20)
    )
    with pytest.raises(ValueError, match="for 5 checkpoint"):
        setup(config(backbones, colours, out, max_steps=10, save_every=2, keep_last=0))


def launcher_free_env() -> dict[str, str]:
    return {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_SIZE", "MASTER_PORT")
    }


def last_step(out: Path) -> int:
    try:
        lines = (out / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return 0
    return json.loads(lines[-1])["step"] if lines else 0


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_exits_cleanly(backbones, colours, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "scripts" / "pretrain.py"), "--vision", backbones["clip"], "--llm"]
    cmd += [
        backbones["llama"],
        "--data",
        colours,
        "--output",
        str(out),
        "--template",
        "plain",
        "--dtype",
        "fp32",
    ]
    cmd += ["--micro-batch-size", "2", "--grad-accum", "1", "--num-workers", "2", "--schedule", "constant"]
    cmd += ["--warmup-ratio", "0", "--save-every", "0", "--max-steps", "500"]
    proc = subprocess.Popen(cmd, env=launcher_free_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # fmt: skip
    try:
        deadline = time.time() + 120
        while last_step(out) < 3 and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        os.killpg(
            proc.pid, signal.SIGTERM
        )  # like a scheduler: the training process and its DataLoader workers
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == STOPPED_EXIT_CODE, stderr[-3000:]
    assert "Traceback" not in stderr and "Error" not in stderr, stderr[-3000:]
    step = last_step(out)
    assert 3 <= step < 500
    assert f"stopped by SIGTERM at step {step} of 500" in stderr and "run the same command again" in stderr
    ckpt = latest_checkpoint(out)
    assert ckpt is not None and ckpt.name == f"checkpoint-{step}"
    verify(ckpt)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stopped_by"] == "SIGTERM" and summary["step"] == step
    check_the_estimate_covers(ckpt, backbones)
    deadline = time.time() + 10
    while time.time() < deadline and not group_gone(proc.pid):
        time.sleep(0.1)
    assert group_gone(proc.pid), "DataLoader workers outlived the run"

    again = subprocess.run(cmd[:-2] + ["--max-steps", str(step + 1)], env=launcher_free_env(), capture_output=True,
                           text=True, timeout=180)  # fmt: skip
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resumed from {ckpt} at step {step}" in again.stderr
    assert json.loads((out / "summary.json").read_text())["steps_this_run"] == 1


def group_gone(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True
    return False


@pytest.mark.parametrize("mask_free", [False, True])
def test_a_micro_batch_without_images_gets_a_blank_row_that_changes_nothing(
    backbones, tiny_config, mask_free
):
    """Text-only (or all-bad) micro-batches: the blank image row keeps vision tower and connector in every forward
    (ZeRO-3 ranks gather the same parameters; stage 1 gets a loss with a gradient) and leaves loss and gradients
    of the real rows exactly as they were."""
    from mllm.data import Collator
    from mllm.model import build_model, load_tokenizer
    from mllm.train.batches import BlankImageRow

    cfg = tiny_config("clip", "llama", "mlp", mode="lora")
    torch.manual_seed(0)
    model = build_model(cfg).eval()  # no dropout: the two passes must be comparable
    tok = load_tokenizer(cfg)
    texts = [("Say hi.", " Hi there."), ("Count to three, please.", " One two three.")]
    items = []
    for q, a in texts:
        ids = tok(q + a)["input_ids"]
        n = len(tok(q)["input_ids"])
        items.append({"input_ids": torch.tensor(ids), "labels": torch.tensor([-100] * n + ids[n:]), "id": q,
                      "pixel_values": torch.zeros((0, 3, 32, 32))})  # fmt: skip
    batch = Collator(tok.pad_token_id, mask_free=mask_free)(items)
    blank = BlankImageRow(tok.pad_token_id, model.num_image_tokens, (3, 32, 32))
    padded = blank(batch)
    assert (
        padded["input_ids"].shape[0] == 3
        and padded["pixel_values"].shape[0] == 1
        and padded["sample_ids"] == batch["sample_ids"]
    )
    assert blank(padded) is padded  # a batch with an image is left alone
    assert (padded["attention_mask"] is None) == mask_free
    assert blank(Collator(tok.pad_token_id)([None, None]))["input_ids"].shape == (1, model.num_image_tokens)

    def loss_and_grads(b):
        model.zero_grad()
        out = model(**{k: v for k, v in b.items() if k != "sample_ids"})
        out.loss_sum.backward()
        return out.loss_sum.detach(), {
            n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None
        }

    loss, grads = loss_and_grads(batch)
    loss_blank, grads_blank = loss_and_grads(padded)
    assert torch.allclose(loss, loss_blank, rtol=1e-6, atol=1e-6)
    assert {n for n in grads_blank if n.startswith("connector.")}  # the connector is in the graph now...
    assert all(
        torch.count_nonzero(grads_blank[n]) == 0 for n in grads_blank if n.startswith("connector.")
    )  # ...at zero
    for n, g in grads.items():
        assert torch.allclose(g, grads_blank[n], rtol=1e-5, atol=1e-7), n


def check_the_estimate_covers(ckpt: Path, backbones) -> None:
    """The pre-flight estimate of a checkpoint's size is at least what was written, and not wildly more."""
    from mllm.model import build_model

    actual = sum(f.stat().st_size for f in ckpt.rglob("*") if f.is_file())
    cfg = resolve_config(stage=1, vision=backbones["clip"], llm=backbones["llama"], dtype="fp32")
    estimate = checkpoint_bytes(build_model(cfg.model_config()))
    print(f"checkpoint: {actual} bytes on disk, estimated {estimate}")
    assert actual <= estimate <= 2 * actual + (4 << 20)
