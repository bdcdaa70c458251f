"""Under load: two processes under the `deepspeed` launcher (ZeRO-3, gloo on CPU), four DataLoader workers each,
two epochs over 2,000 tiny samples. It must finish (no deadlock), leave no process behind, and its memory must
not grow step over step (measured per step; the figures are printed)."""

from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
from PIL import Image

from mllm.checkpoint import latest_checkpoint

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = 2000
MICRO_BATCH = 8
pytestmark = pytest.mark.slow


def write_samples(folder: Path) -> str:
    """2,000 tiny samples: image-caption pairs, each with its own 16×16 PNG, and every tenth one text only (length
    grouping puts those together: some micro-batches of one rank have no image while the other rank's do)."""
    (folder / "img").mkdir(parents=True)
    rng = np.random.default_rng(0)
    records = []
    for i in range(SAMPLES):
        colour = rng.integers(0, 256, 3)
        if i % 10 == 9:
            conversation = [{"from": "human", "value": "Say a colour."}, {"from": "gpt", "value": "red"}]
            records.append({"id": str(i), "conversations": conversation})
            continue
        Image.new("RGB", (16, 16), tuple(int(c) for c in colour)).save(folder / "img" / f"{i}.png")
        conversation = [
            {"from": "human", "value": "<image>"},
            {"from": "gpt", "value": f"colour {colour[0]}"},
        ]
        records.append({"id": str(i), "image": f"img/{i}.png", "conversations": conversation})
    (folder / "data.json").write_text(json.dumps(records))
    return str(folder / "data.json")


def launcher() -> list[str]:
    beside = Path(sys.executable).with_name("deepspeed")
    return [str(beside)] if beside.is_file() else ["deepspeed"]


class TreeMemory(threading.Thread):
    """Samples the memory of a process and all its descendants (ranks, DataLoader workers) twice a second: the
    sum of their PSS (shared pages split between the processes sharing them, so forked workers are not counted
    twice)."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.root = psutil.Process(pid)
        self.samples: list[tuple[float, float, int]] = []  # (time, MiB, processes)
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.5):
            try:
                procs = [self.root, *self.root.children(recursive=True)]
                rss = sum(p.memory_full_info().pss for p in procs if p.is_running())
            except psutil.Error:
                continue
            self.samples.append((time.time(), rss / 2**20, len(procs)))


def growth(values: list[float]) -> tuple[float, float]:
    """(MiB from the first to the last fifth of the run, by medians; least-squares slope in MiB per 100 steps),
    leaving out the first tenth (allocator and caches warming up)."""
    v = np.asarray(values[len(values) // 10 :], dtype=float)
    fifth = max(1, len(v) // 5)
    slope = np.polyfit(np.arange(len(v)), v, 1)[0] * 100
    return float(np.median(v[-fifth:]) - np.median(v[:fifth])), float(slope)


def test_two_process_zero3_with_workers_over_2000_samples(backbones, tmp_path, capsys):
    data = write_samples(tmp_path / "data")
    out = tmp_path / "run"
    port = 29400 + os.getpid() % 200
    cmd = launcher() + ["--num_gpus", "2", "--master_port", str(port)]
    cmd += [str(ROOT / "scripts" / "pretrain.py"), "--zero", str(ROOT / "zero_configs" / "z3.json")]
    cmd += ["--vision", backbones["clip"], "--llm", backbones["llama"], "--data", data, "--output", str(out)]
    cmd += [
        "--template",
        "plain",
        "--dtype",
        "fp32",
        "--micro-batch-size",
        str(MICRO_BATCH),
        "--grad-accum",
        "1",
    ]
    cmd += ["--num-workers", "4", "--epochs", "2", "--save-every", "0", "--lr", "1e-3", "--log-every", "25"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_SIZE")}
    env["OMP_NUM_THREADS"] = "1"  # 2 ranks + 8 workers on a small CPU machine
    started = time.time()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # fmt: skip
    memory = TreeMemory(proc.pid)
    memory.start()
    try:
        output, _ = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"no progress for 240 s (deadlock?):\n{output[-3000:]}")
    finally:
        memory.stop.set()
        memory.join()
    seconds = time.time() - started
    assert proc.returncode == 0, output[-5000:]

    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = (
        2 * SAMPLES // (2 * MICRO_BATCH)
    )  # two epochs: DataLoader workers are started afresh for the second
    assert [r["step"] for r in records] == list(range(1, steps + 1))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["samples_per_s"] > 0 and summary["step"] == steps and summary["skipped_samples"] == 0
    assert latest_checkpoint(out).name == f"checkpoint-{steps}"

    deadline = time.time() + 15
    while time.time() < deadline and not group_gone(proc.pid):
        time.sleep(0.2)
    assert group_gone(proc.pid), f"left behind: {survivors(proc.pid)}"
    # DeepSpeed's CPU all-reduce segments (~70 MB of RAM each) must not outlive the run
    leaked = sorted(glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_{port}_*"))
    assert not leaked, f"shared memory left in /dev/shm: {leaked}"

    rank0, rank0_slope = growth([r["rss_mb"] for r in records])
    busy = [(t, m) for t, m, n in memory.samples if n >= 11]  # launcher, 2 ranks and 8 workers all up
    assert len(busy) >= 10, f"too few memory samples of the whole process tree: {memory.samples}"
    tree, _ = growth([m for _, m in busy])
    minutes = (busy[-1][0] - busy[0][0]) / 60
    with capsys.disabled():  # shown in every test log, not only on failure
        print(
            f"\n{steps} steps in {seconds:.0f} s. Rank-0 RSS {records[0]['rss_mb']:.0f} → "
            f"{records[-1]['rss_mb']:.0f} MiB: growth {rank0:+.1f} MiB from the first to the last fifth "
            f"({rank0_slope:+.2f} MiB per 100 steps). Whole tree (launcher, 2 ranks, 8 workers; summed PSS): "
            f"{busy[0][1]:.0f} → {busy[-1][1]:.0f} MiB, growth {tree:+.1f} MiB over {minutes:.1f} min"
        )
    assert rank0 < 25 and rank0_slope < 20, "the training process's memory grows step over step"
    assert tree < 100, "the process tree's memory grows step over step"


def group_gone(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True
    return False


def survivors(pgid: int) -> list[str]:
    return [" ".join(p.cmdline()[:4]) for p in psutil.process_iter() if _pgid(p) == pgid]


def _pgid(p) -> int | None:
    try:
        return os.getpgid(p.pid)
    except OSError:
        return None
