"""Integrity: a damaged or non-finite checkpoint is refused with the file (and tensor) named, on every load path;
a non-finite training step is skipped on every rank, logged and counted; too many in a row stop the run without
saving, and the last finite checkpoint stays usable."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest
import torch
from helpers import make_checkpoint

from mllm.checkpoint import COMPLETE_FILE, CheckpointError, latest_checkpoint, load_model_and_config
from mllm.cli import main as mllm_main
from mllm.train import checkpointing
from mllm.train import distributed as dist
from mllm.train.config import resolve_config
from mllm.train.loop import setup, train_step
from mllm.train.nonfinite import FAULT_ENV, Fault, NonFiniteTraining
from mllm.train.progress import read_metrics

ROOT = Path(__file__).resolve().parents[1]
WEIGHT_FILE = {
    "frozen": "connector.safetensors",
    "full": "llm.safetensors",
    "lora": "adapter/adapter_model.safetensors",
}


@pytest.fixture(scope="module")
def colours(tmp_path_factory) -> str:
    from test_train_runs import write_colours

    return write_colours(tmp_path_factory.mktemp("colours"))


pytestmark = pytest.mark.usefixtures("one_process_group")


def overwrite_tail(path: Path, payload: bytes) -> None:
    """Overwrite the last bytes of `path` in place: the size (all the old manifest checked) stays the same."""
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.seek(size - len(payload))
        f.write(payload)
    assert path.stat().st_size == size


NAN_BYTES = b"\x00\x00\xc0\x7f" * 16  # 16 float32 NaNs, the "last 64 bytes"


@pytest.mark.parametrize("mode", ["frozen", "full", "lora"])
def test_same_size_corruption_of_each_weight_file_is_caught_with_the_file_named(tmp_path, tiny_config, mode):
    ckpt = Path(make_checkpoint(tmp_path / "c", tiny_config(mode=mode)))
    load_model_and_config(ckpt)  # intact: loads
    damaged = ckpt / WEIGHT_FILE[mode]
    overwrite_tail(damaged, NAN_BYTES)
    with pytest.raises(CheckpointError, match=f"{damaged}: its content differs from the xxh3_128 hash"):
        load_model_and_config(ckpt)
    # --no-verify skips the hash, never the values: the NaNs are named with their tensor
    with pytest.raises(CheckpointError, match=f"{damaged}: tensor '.+' holds 16 non-finite value"):
        load_model_and_config(ckpt, verify_hashes=False)


def test_nonfinite_weights_saved_with_a_valid_manifest_are_refused(tmp_path, tiny_config):
    def poison(model):
        next(iter(model.connector.parameters())).view(-1)[3] = float("inf")

    ckpt = Path(make_checkpoint(tmp_path / "c", tiny_config(), edit=poison))
    (name,) = load_weights_names(ckpt)
    with pytest.raises(CheckpointError, match=f"connector.safetensors: tensor '{name}' holds 1 non-finite"):
        load_model_and_config(ckpt)


def load_weights_names(ckpt: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(ckpt / "connector.safetensors"), "pt") as f:
        return [k for k in f.keys() if not torch.isfinite(f.get_tensor(k)).all()]


def test_a_manifest_without_hashes_still_loads(tmp_path, tiny_config):
    ckpt = Path(make_checkpoint(tmp_path / "c", tiny_config()))
    manifest = json.loads((ckpt / COMPLETE_FILE).read_text())
    old = {rel: entry["size"] for rel, entry in manifest["files"].items()}  # the format before hashes
    (ckpt / COMPLETE_FILE).write_text(json.dumps({"files": old}))
    load_model_and_config(ckpt)


def test_chat_names_the_damaged_connector_and_no_verify_still_refuses_its_nan(tmp_path, tiny_config, capsys):
    """The issue's case: the connector's last 64 bytes overwritten; chat answered "" before."""
    ckpt = Path(make_checkpoint(tmp_path / "c", tiny_config()))
    overwrite_tail(ckpt / "connector.safetensors", NAN_BYTES)
    assert mllm_main(["chat", str(ckpt), "--prompt", "hi"]) == 2
    assert "connector.safetensors: its content differs from the xxh3_128 hash" in capsys.readouterr().err
    assert mllm_main(["chat", str(ckpt), "--prompt", "hi", "--no-verify"]) == 2
    assert "connector.safetensors: tensor" in capsys.readouterr().err


def config(backbones, data, output, stage=1, **kw):
    base = dict(vision=backbones["clip"], llm=backbones["llama"], data=data, output=str(output), dtype="fp32")
    base |= dict(micro_batch_size=2, grad_accum=2, num_workers=0, warmup_ratio=0.0, seed=3, template="plain")
    return resolve_config(stage=stage, **{**base, **kw})


@pytest.mark.slow
def test_init_from_a_damaged_stage1_connector_names_the_file(backbones, colours, tmp_path, tiny_config):
    stage1 = Path(make_checkpoint(tmp_path / "stage1", tiny_config()))
    overwrite_tail(stage1 / "connector.safetensors", NAN_BYTES)
    with pytest.raises(CheckpointError, match="stage1/connector.safetensors: its content differs"):
        setup(config(backbones, colours, tmp_path / "s2", stage=2, init_from=str(stage1), llm_mode="lora"))
    with pytest.raises(
        CheckpointError, match="stage1/connector.safetensors: tensor '.+' holds 16 non-finite"
    ):
        setup(
            config(
                backbones,
                colours,
                tmp_path / "s2",
                stage=2,
                init_from=str(stage1),
                llm_mode="lora",
                no_verify=True,
            )
        )


def trainable(session) -> dict[str, torch.Tensor]:
    params = [(n, p) for n, p in session.model.named_parameters() if p.requires_grad]
    with dist.gathered([p for _, p in params]):
        return {n: p.detach().clone() for n, p in params}


@pytest.mark.slow
@pytest.mark.parametrize("zero", ["", "z3.json"])
def test_a_nonfinite_loss_or_gradient_skips_the_step_and_a_nonfinite_weight_is_never_saved(
    backbones, colours, tmp_path, zero
):
    """One process, ZeRO-2 (the built-in config) and ZeRO-3: the step is discarded whole (weights, optimizer
    state, lr schedule), and a save of non-finite weights is refused with the older checkpoint kept."""
    cfg = config(backbones, colours, tmp_path / "run", zero=str(ROOT / "zero_configs" / zero) if zero else "")
    s = setup(cfg)
    step = lambda n, fault=None: train_step(s.engine, s.stream, s.world, s.grad_accum, n, fault)  # noqa: E731
    before, lr = trainable(s), s.engine.lr_scheduler.get_last_lr()
    for n, kind, reason in ((1, "loss", "loss"), (2, "grad", "gradient norm")):
        record = step(n, Fault(kind, frozenset({n})))
        assert record["skipped"] == reason and len(record["sample_ids"]) == s.grad_accum
        after = trainable(s)
        assert all(torch.equal(before[k], after[k]) for k in before), kind
        assert s.engine.lr_scheduler.get_last_lr() == lr and s.engine.skipped_steps == n
    assert step(3)["skipped"] is None  # the next step trains as usual
    after = trainable(s)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert all(torch.isfinite(t).all() for t in after.values())

    meta = checkpointing.model_meta(cfg, s.data.recipe, 3)
    save = lambda n: checkpointing.save(  # noqa: E731
        s.engine, s.model, s.world, cfg, n, s.stream.state_dict(), {"step": n}, meta
    )
    saved = save(3)
    params = [p for p in s.model.parameters() if p.requires_grad]
    with dist.gathered_for_update(params), torch.no_grad():
        params[0].view(-1)[0] = float("nan")
    with pytest.raises(
        CheckpointError, match="refusing to write checkpoint-4: trainable weights are not finite"
    ):
        save(4)
    assert latest_checkpoint(cfg.output) == saved and sorted(p.name for p in Path(cfg.output).iterdir()) == [
        "checkpoint-3",
        "run_config.yaml",
    ]
    s.stream.close()


def test_the_fault_hook_reads_its_variable():
    assert Fault.from_env({}) is None
    assert Fault.from_env({FAULT_ENV: "grad:2,3@1"}) == Fault("grad", frozenset({2, 3}), 1)
    with pytest.raises(ValueError, match=f"{FAULT_ENV}='nan:x'"):
        Fault.from_env({FAULT_ENV: "nan:x"})


# ---- two processes under the launcher ---------------------------------------------------------------------
def launch(script: str, args: list[str], port: int, fault: str | None) -> subprocess.CompletedProcess:
    from test_train_deepspeed import launcher

    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_SIZE", "MASTER_PORT", FAULT_ENV)
    }
    if fault:
        env[FAULT_ENV] = fault
    cmd = launcher() + ["--num_gpus", "2", "--master_port", str(port + os.getpid() % 200), script, *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=420)


@pytest.mark.slow
def test_two_processes_skip_a_step_poisoned_on_one_rank_stop_after_a_run_of_them_and_resume(
    backbones, colours, tmp_path
):
    """ZeRO-3: NaN loss on rank 1 only at steps 2, 4 and 5 (`--max-skipped-steps 2`): step 2 is skipped on both
    ranks, checkpoint-3 is written, steps 4-5 stop the run with nothing saved; a resume finishes from
    checkpoint-3. ZeRO-2: a NaN gradient (finite loss) on rank 0 at step 2 is skipped on both ranks."""
    script = str(ROOT / "scripts" / "pretrain.py")
    common = [
        "--vision",
        backbones["clip"],
        "--llm",
        backbones["llama"],
        "--data",
        colours,
        "--dtype",
        "fp32",
    ]
    common += ["--micro-batch-size", "2", "--grad-accum", "1", "--num-workers", "0", "--template", "plain"]
    common += ["--warmup-ratio", "0", "--seed", "3", "--max-skipped-steps", "2", "--keep-last", "1"]
    z3 = tmp_path / "z3"
    args = common + [
        "--zero",
        str(ROOT / "zero_configs" / "z3.json"),
        "--output",
        str(z3),
        "--save-every",
        "3",
    ]
    stopped = launch(script, args + ["--max-steps", "6"], 29400, "loss:2,4,5@1")
    log = stopped.stdout + stopped.stderr
    assert stopped.returncode != 0, log[-3000:]
    assert "stopped: 2 optimizer steps in a row (steps 4-5) had a non-finite loss or gradient norm" in log
    assert f"the newest checkpoint is {z3 / 'checkpoint-3'}" in log
    # every rank saw it (rank 0's own loss was finite) and logs the samples of its own micro-batches
    for rank in (0, 1):
        assert re.search(
            f"step 2: non-finite loss \\(detected on every rank\\).*Rank {rank}'s micro-batches", log
        )
    assert [p.name for p in z3.glob("checkpoint-*")] == ["checkpoint-3"]
    records = read_metrics(z3)
    assert [r["step"] for r in records if r["skipped"]] == [2, 4, 5]
    assert records[-1]["skipped_steps"] == 3
    summary = json.loads((z3 / "summary.json").read_text())
    assert summary["skipped_steps"] == 3 and summary["stopped_by"] == "non-finite steps"
    load_model_and_config(z3)  # the last finite checkpoint: intact and loadable

    resumed = launch(script, args + ["--max-steps", "6"], 29420, None)
    assert resumed.returncode == 0, (resumed.stdout + resumed.stderr)[-3000:]
    summary = json.loads((z3 / "summary.json").read_text())
    assert summary["step"] == 6 and summary["steps_this_run"] == 3 and summary["skipped_steps"] == 1
    assert [p.name for p in z3.glob("checkpoint-*")] == ["checkpoint-6"]

    z2 = tmp_path / "z2"
    args = common + [
        "--zero",
        str(ROOT / "zero_configs" / "z2.json"),
        "--output",
        str(z2),
        "--max-steps",
        "3",
    ]
    run = launch(script, args, 29440, "grad:2@0")
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
    assert "step 2: non-finite gradient norm (detected on every rank)" in run.stdout + run.stderr
    assert [r["skipped"] for r in read_metrics(z2)] == [None, "gradient norm", None]
    assert json.loads((z2 / "summary.json").read_text())["skipped_steps"] == 1


@pytest.mark.slow
def test_a_run_of_nonfinite_steps_stops_one_process_with_the_message(
    backbones, colours, tmp_path, monkeypatch
):
    from mllm.train.loop import train

    monkeypatch.setenv(FAULT_ENV, "loss:1,2")
    cfg = config(backbones, colours, tmp_path / "run", max_steps=4, max_skipped_steps=2, grad_accum=1)
    with pytest.raises(
        NonFiniteTraining, match="2 optimizer steps in a row \\(steps 1-2\\).*none \\(no checkpoint"
    ):
        train(cfg)
    assert not list(Path(cfg.output).glob("checkpoint-*"))
    assert json.loads((Path(cfg.output) / "summary.json").read_text())["skipped_steps"] == 2
