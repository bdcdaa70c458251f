"""Crash safety: a real training run (scripts/pretrain.py, one process, a DataLoader worker) is SIGKILLed at five
seeded moments — during a step, during checkpoint writes, during start-up — and started again each time. No
`checkpoint-N` directory is ever incomplete, nothing leaks, and the final weights equal an uninterrupted run's.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mllm.checkpoint import latest_checkpoint, list_checkpoints, verify

ROOT = Path(__file__).resolve().parents[1]
SEED = 20261125
STEPS, SAVE_EVERY = 10, 2
pytestmark = pytest.mark.slow


def command(backbones, data: str, output: Path) -> list[str]:
    args = [sys.executable, str(ROOT / "scripts" / "pretrain.py"), "--vision", backbones["clip"]]
    args += ["--llm", backbones["llama"], "--data", data, "--output", str(output), "--template", "plain"]
    args += [
        "--dtype",
        "fp32",
        "--seed",
        "3",
        "--lr",
        "0.01",
        "--warmup-ratio",
        "0",
        "--micro-batch-size",
        "2",
    ]
    args += ["--grad-accum", "1", "--num-workers", "1", "--max-steps", str(STEPS)]
    return args + ["--save-every", str(SAVE_EVERY), "--keep-last", "2"]


def environment() -> dict[str, str]:
    launcher = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_SIZE", "MASTER_PORT")
    return {k: v for k, v in os.environ.items() if k not in launcher}


def last_step(output: Path, since_ns: int) -> int | None:
    """The last step in metrics.jsonl, once the current process has written it (older content is stale)."""
    path = output / "metrics.jsonl"
    try:
        if path.stat().st_mtime_ns < since_ns:
            return None
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return None
    for line in reversed(lines):
        try:
            return json.loads(line)["step"]
        except ValueError:
            continue
    return None


def moment(output: Path, started_ns: int) -> dict:
    """What the (frozen) run was doing: its last finished step and any checkpoint it was writing (a temporary
    folder left by an earlier kill does not count: the run removes those when it starts)."""
    tmp = sorted(p for p in output.glob(".tmp-checkpoint-*") if p.stat().st_mtime_ns >= started_ns)
    return {
        "last_step": last_step(output, started_ns),
        "writing": tmp[0].name if tmp else None,
        "written_files": sorted(str(f.relative_to(tmp[0])) for f in tmp[0].rglob("*") if f.is_file())
        if tmp
        else [],
    }


def wait_for(proc: subprocess.Popen, condition, timeout: float = 120.0) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            return False
        if condition():
            return True
        time.sleep(0.001)
    return False


def run_briefly(proc: subprocess.Popen, seconds: float) -> None:
    """Let a frozen run go on for about `seconds`, then freeze it again."""
    proc.send_signal(signal.SIGCONT)
    time.sleep(seconds)
    proc.send_signal(signal.SIGSTOP)


def target_of(plan: tuple, resume: int) -> float:
    """The plan's moment for a run resuming at step `resume` (targets move with the resume point)."""
    kind, n = plan
    if (
        kind == "step"
    ):  # the n-th step after the resume point that no save follows (odd: saves are at even steps)
        return resume + 2 * n - 1
    if kind == "save":
        return STEPS if n == "final" else resume + SAVE_EVERY * n
    return n  # start-up: seconds after launch


def kill_at(proc: subprocess.Popen, output: Path, started_ns: int, plan: tuple, resume: int, rng) -> dict:
    """Freeze the run (SIGSTOP) at the planned moment, let it go on for a random sliver, note what it was doing,
    SIGKILL it. The run only moves while let: a busy machine delaying this test cannot make it miss a moment."""
    kind, target = plan[0], target_of(plan, resume)
    if kind == "step":  # step `target` has finished; the next one is under way
        reached = wait_for(proc, lambda: last_step(output, started_ns) == target)
        proc.send_signal(signal.SIGSTOP)
        run_briefly(proc, rng.uniform(0.0, 0.004))  # tiny steps take milliseconds on an idle machine
    elif kind == "save":  # the save right after step `target` has begun writing
        reached = wait_for(proc, lambda: last_step(output, started_ns) == target)
        proc.send_signal(signal.SIGSTOP)
        tmp = output / f".tmp-checkpoint-{target}"
        for _ in range(2000):
            if tmp.exists() or proc.poll() is not None:
                break
            run_briefly(proc, 0.001)
        run_briefly(proc, rng.uniform(0.0, 0.02))  # somewhere inside the write
    else:  # start-up: loading backbones, reading the data, restoring the checkpoint
        reached = wait_for(proc, lambda: time.time_ns() - started_ns > target * 1e9)
        proc.send_signal(signal.SIGSTOP)
    assert reached, f"the run ended (rc={proc.returncode}) before the planned moment {plan} → {target}"
    seen = moment(output, started_ns)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return {"plan": plan, "target": target, **seen}


def check_no_checkpoint_looks_complete_unless_it_is(output: Path) -> list[int]:
    """Every `checkpoint-N` verifies and its weights parse; returns the steps present."""
    steps = []
    for step, path in list_checkpoints(output):
        verify(path)  # manifest present and every file the size it lists
        assert load_file(str(path / "connector.safetensors")), path
        steps.append(step)
    return steps


def connector(output: Path) -> dict[str, torch.Tensor]:
    ckpt = latest_checkpoint(output)
    assert ckpt is not None and ckpt.name == f"checkpoint-{STEPS}", ckpt
    return load_file(str(ckpt / "connector.safetensors"))


def losses(output: Path) -> dict[int, float]:
    return {
        r["step"]: r["loss"] for r in map(json.loads, (output / "metrics.jsonl").read_text().splitlines())
    }


def group_gone(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True
    return False


def test_five_sigkills_then_resume_equal_an_uninterrupted_run(backbones, tmp_path, capsys):
    from test_train_runs import write_colours

    data = write_colours(tmp_path / "data")
    rng = random.Random(SEED)
    plans = [  # (kind, which): targets are placed after the checkpoint each restart resumes from
        ("step", rng.choice([1, 2])),  # inside a step (no save follows the step before it)
        ("save", rng.choice([1, 2])),  # inside a checkpoint write
        ("startup", rng.uniform(1.0, 4.0)),  # seconds after launch: loading the model, data or checkpoint
        ("step", 1),
        ("save", "final"),  # inside the write of the last checkpoint
    ]
    out = tmp_path / "crashed"
    seen, groups = [], []
    for plan in plans:
        newest = latest_checkpoint(out)
        resume = int(newest.name.split("-")[1]) if newest else 0
        started = time.time_ns()
        # niced: when the machine is busy, this test (polling, freezing) runs before the training process does
        proc = subprocess.Popen(["nice", "-n", "10", *command(backbones, data, out)], env=environment(),
                                start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        groups.append(proc.pid)
        try:
            seen.append(kill_at(proc, out, started, plan, resume, rng))
        finally:
            proc.kill()
            proc.wait()
        present = check_no_checkpoint_looks_complete_unless_it_is(out)
        newest = latest_checkpoint(out)
        assert (newest.name if newest else None) == (f"checkpoint-{max(present)}" if present else None)
    final = subprocess.run(command(backbones, data, out), env=environment(), capture_output=True, text=True,
                           timeout=300, start_new_session=True)  # fmt: skip
    assert final.returncode == 0, final.stderr[-3000:]
    assert not list(out.glob(".tmp-checkpoint-*")) and not list(out.glob(".deleting-*"))

    reference = tmp_path / "reference"
    ref = subprocess.run(command(backbones, data, reference), env=environment(), capture_output=True, text=True,
                         timeout=300)  # fmt: skip
    assert ref.returncode == 0, ref.stderr[-3000:]
    a, b = connector(reference), connector(out)
    assert a.keys() == b.keys()
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a), (
        f"final weights differ from the uninterrupted run by {worst}"
    )
    la, lb = losses(reference), losses(out)
    assert sorted(lb) == list(range(1, STEPS + 1)) and all(la[s] == lb[s] for s in la)

    for s in seen:
        with capsys.disabled():  # shown in every test log, not only on failure
            print(
                f"killed at {s['plan']} (target {s['target']}): last finished step {s['last_step']}, "
                f"writing {s['writing']} ({len(s['written_files'])} files so far)"
            )
    during_step = [
        s for s in seen if s["plan"][0] == "step" and s["last_step"] == s["target"] and not s["writing"]
    ]
    during_write = [
        s for s in seen if s["plan"][0] == "save" and s["writing"] == f".tmp-checkpoint-{s['target']}"
    ]
    # the issue asks for kills during a step and during a checkpoint write; on a loaded machine a planned moment can
    # slip by a step, so at least one of each must have been hit exactly (all five kills were survived regardless)
    assert during_step and during_write, seen
    deadline = time.time() + 15  # a killed run's DataLoader worker notices its parent is gone and exits
    while not all(map(group_gone, groups)) and time.time() < deadline:
        time.sleep(0.2)
    assert all(map(group_gone, groups)), "processes of a killed run are still alive"
