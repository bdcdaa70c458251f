"""Runs as a cluster runs them: every rank started directly in one process group (as `srun` starts its tasks),
the whole group signalled with SIGTERM while a slow checkpoint save is under way."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mllm.checkpoint import latest_checkpoint, verify
from mllm.train.checkpointing import SLOW_SAVE_ENV
from mllm.train.stop import STOPPED_EXIT_CODE

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def write_colours(folder: Path) -> str:
    from test_train_runs import write_colours as write

    return write(folder)


def pretrain(backbones, data: str, output: Path, *extra: str) -> list[str]:
    """scripts/pretrain.py on the tiny backbones: 2 samples per step (1 per micro-batch), constant lr, no scheduled saves."""
    cmd = [sys.executable, str(ROOT / "scripts" / "pretrain.py"), "--vision", backbones["clip"]]
    cmd += ["--llm", backbones["llama"], "--data", data, "--output", str(output), "--template", "plain"]
    cmd += ["--dtype", "fp32", "--seed", "3", "--lr", "0.01", "--warmup-ratio", "0", "--schedule", "constant"]
    return cmd + ["--micro-batch-size", "1", "--global-batch-size", "2", "--save-every", "0", *extra]


def rank_env(
    rank: int, world_size: int, port: int, node_rank: int | None = None, **extra: str
) -> dict[str, str]:
    """The torch.distributed variables a scheduler's task launcher sets for one rank (one rank per node when
    `node_rank` is given, else all ranks on this node)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_SIZE")}
    local = (0, 1) if node_rank is not None else (rank, world_size)
    env.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(local[0]), LOCAL_SIZE=str(local[1]))
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), **extra)
    return env


def start_ranks(cmd: list[str], world_size: int, port: int, **extra_env: str) -> list[subprocess.Popen]:
    """`world_size` processes of `cmd`, like srun's tasks; each leads a process group (its pid) with its workers."""
    return [
        subprocess.Popen(
            cmd,
            env=rank_env(rank, world_size, port, **extra_env),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )  # fmt: skip
        for rank in range(world_size)
    ]


def signal_all(procs: list[subprocess.Popen], sig: int) -> None:
    """`sig` to every process of the job at once: the ranks and their DataLoader workers, as Slurm does."""
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, sig)


def finish(procs: list[subprocess.Popen], timeout: float) -> list[tuple[int, str]]:
    """(exit status, stderr) of every process; the whole group is SIGKILLed if one of them overruns."""
    try:
        return [(p.communicate(timeout=timeout)[1], p.returncode)[::-1] for p in procs]
    finally:
        signal_all(procs, signal.SIGKILL)
        for p in procs:
            p.wait()


def losses(out: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows}


def last_step(out: Path) -> int:
    try:
        return max(losses(out), default=0)
    except FileNotFoundError:
        return 0


def free_port() -> int:
    from mllm.train.distributed import _free_port

    return _free_port()


def test_group_sigterm_during_a_slow_save_ends_with_a_complete_checkpoint_and_143(backbones, tmp_path):
    """2 ranks × 2 DataLoader workers; SIGTERM to the whole group; the save it causes takes 17 s (> the 15 s a
    worker used to wait before ending itself). Every rank exits 143 with a complete checkpoint, and the rerun's
    losses equal those of a run never interrupted."""
    data, out, straight = write_colours(tmp_path / "data"), tmp_path / "run", tmp_path / "straight"
    procs = start_ranks(
        pretrain(backbones, data, out, "--num-workers", "2", "--max-steps", "500"), 2, free_port(),
        **{SLOW_SAVE_ENV: "17"},
    )  # fmt: skip
    deadline = time.time() + 600  # start-up alone takes minutes on a loaded 2-core machine
    while last_step(out) < 2 and procs[0].poll() is None and time.time() < deadline:
        time.sleep(0.05)
    signal_all(procs, signal.SIGTERM)
    ended = finish(procs, timeout=120)
    for code, stderr in ended:
        assert code == STOPPED_EXIT_CODE, stderr[-3000:]
        assert "Traceback" not in stderr and "exited unexpectedly" not in stderr, stderr[-3000:]
    step = last_step(out)
    ckpt = latest_checkpoint(out)
    assert ckpt is not None and ckpt.name == f"checkpoint-{step}"
    verify(ckpt)
    assert sorted(p.name for p in ckpt.glob("rank*_state.pt")) == ["rank0_state.pt", "rank1_state.pt"]

    until = ["--num-workers", "2", "--max-steps", str(step + 3)]
    for output in (out, straight):
        ended = finish(start_ranks(pretrain(backbones, data, output, *until), 2, free_port()), timeout=240)
        assert all(code == 0 for code, _ in ended), ended[0][1][-3000:]
        assert (f"resumed from {ckpt} at step {step}" in ended[0][1]) == (output == out)
    resumed, reference = losses(out), losses(straight)
    assert [resumed[s] for s in range(1, step + 4)] == [reference[s] for s in range(1, step + 4)]


def run_ranks(cmd: list[str], world_size: int) -> str:
    """Run `cmd` on `world_size` ranks to the end; returns rank 0's stderr."""
    ended = finish(start_ranks(cmd, world_size, free_port()), timeout=400)
    assert all(code == 0 for code, _ in ended), ended[0][1][-3000:]
    return ended[0][1]


def connector(out: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(latest_checkpoint(out) / "connector.safetensors"))


ELASTIC_TOLERANCE = 1e-4
"""Losses and weights after an elastic resume equal an uninterrupted run's to this (absolute) difference: the
same samples make each step; only the order in which the float sums are taken differs with the world size."""


def test_elastic_resume_across_world_sizes_and_zero_stages(backbones, tmp_path):
    """Runs of 6 steps (cosine lr, global batch 2, checkpoint at step 3) on 2 and on 1 process, under ZeRO-2 and
    ZeRO-3; each step-3 checkpoint continued on the other world size under its stage. Steps 4-6 (an epoch ends
    after step 4) and the final weights equal the uninterrupted run's of that world size."""
    data = write_colours(tmp_path / "data")
    common = [
        "--num-workers",
        "0",
        "--schedule",
        "cosine",
        "--max-steps",
        "6",
        "--save-every",
        "3",
        "--keep-last",
        "0",
    ]
    zero = {z: ["--zero", str(ROOT / "zero_configs" / f"{z}.json")] for z in ("z2", "z3")}
    straight = {(n, z): tmp_path / f"{n}-{z}" for n in (1, 2) for z in zero}
    for (n, z), out in straight.items():
        run_ranks(pretrain(backbones, data, out, *common, *zero[z]), n)
    reference = {key: losses(out) for key, out in straight.items()}
    assert all(
        abs(reference[key][s] - reference[1, "z2"][s]) < ELASTIC_TOLERANCE
        for key in reference
        for s in range(1, 7)
    )

    for (saved, z), source in straight.items():
        resumed = 3 - saved
        out = tmp_path / f"{saved}-to-{resumed}-{z}"
        out.mkdir()
        shutil.copytree(source / "checkpoint-3", out / "checkpoint-3")
        stderr = run_ranks(pretrain(backbones, data, out, *common, *zero[z]), resumed)
        assert f"resharding it for {resumed}" in stderr and "at step 3 " in stderr, stderr[-3000:]
        after, expected = losses(out), reference[resumed, z]
        assert sorted(after) == [4, 5, 6]
        assert max(abs(after[s] - expected[s]) for s in after) < ELASTIC_TOLERANCE, (
            out.name,
            after,
            expected,
        )
        final, weights = connector(out), connector(straight[resumed, z])
        assert all(torch.allclose(final[k], weights[k], atol=ELASTIC_TOLERANCE, rtol=0) for k in weights)
        assert not list(out.glob(".tmp-*")), "the universal checkpoint's scratch folder was left behind"


def launcher() -> list[str]:
    from test_train_deepspeed import launcher as deepspeed

    return deepspeed()


def two_nodes(cmd: list[str], hostfile: Path, port: int) -> list[tuple[int, str]]:
    """`cmd` on two "nodes" of this machine: one `deepspeed --no_ssh` launcher per node rank, as each node of a
    cluster job runs it (README: multi-node), one process each."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_SIZE")}
    env["OMP_NUM_THREADS"] = "1"  # two "nodes" share this machine's cores, which real nodes would not
    where = [
        "--hostfile",
        str(hostfile),
        "--no_ssh",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(port),
    ]
    nodes = [
        subprocess.Popen(
            launcher() + where + ["--node_rank", str(node), *cmd],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        for node in (0, 1)
    ]
    return finish(nodes, timeout=400)


def test_two_nodes_train_checkpoint_to_the_shared_output_and_resume(backbones, tmp_path):
    data, out = write_colours(tmp_path / "data"), tmp_path / "shared"
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node-a slots=1\nnode-b slots=1\n")
    cmd = pretrain(backbones, data, out, "--num-workers", "0", "--save-every", "2")[
        1:
    ]  # the launcher runs python
    for steps in (2, 3):
        ended = two_nodes([*cmd, "--max-steps", str(steps)], hostfile, free_port())
        assert all(code == 0 for code, _ in ended), ended[0][1][-3000:] + ended[1][1][-3000:]
        ckpt = latest_checkpoint(out)
        assert ckpt is not None and ckpt.name == f"checkpoint-{steps}"
        assert sorted(p.name for p in ckpt.glob("rank*_state.pt")) == ["rank0_state.pt", "rank1_state.pt"]
        assert json.loads((ckpt / "trainer_state.json").read_text())["world_size"] == 2
    assert "resumed from" in ended[0][1] and f"{out / 'checkpoint-2'} at step 2" in ended[0][1], ended[0][1][
        -3000:
    ]
    assert sorted(losses(out)) == [1, 2, 3]
