#!/usr/bin/env python3
"""How start-up cost grows with the data: `mllm data check` and `mllm train` (until its first step) on LLaVA JSON.

    python shared/bench/make_work.py WORK                       # backbones, images, instruct.json
    python scripts/scale.py --work WORK --sizes 10000 100000 665000

For each size N it writes WORK/scale/llava_N.json (LLaVA conversation format:
the work's instruction samples repeated with fresh ids, so samples share the
work's images, as LLaVA-1.5's 665k mix shares COCO's), then runs, each in its
own process tree, timing wall-clock and sampling the tree's resident memory:

  data check, cold   `mllm data check` with an empty length cache
  data check, warm   the same command again (the on-disk length cache answers)
  train, cold        `mllm train --stage 2` until metrics.jsonl has its first step, empty cache
  train, warm        the same again, warm cache

and prints seconds and peak PSS (GB) per run, plus the extra RSS over the
smallest size. Targets (issue 15): the 665k set indexed in <= 3 min with
<= 2 GB extra RSS on 2 cores; a second start <= 20 s.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil


def write_data(work: Path, n: int) -> Path:
    """WORK/llava_N.json: the work's instruct samples cycled to N, ids made unique, images under images/."""
    out = work / f"llava_{n}.json"
    if out.exists():
        return out
    base = json.loads((work / "instruct.json").read_text())
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    with open(tmp, "w") as f:  # streamed: the file itself can be ~1 GB
        f.write("[")
        for i in range(n):
            sample = dict(base[i % len(base)], id=f"s{i}")
            if "image" in sample:
                sample["image"] = f"images/{sample['image']}"
            f.write(("," if i else "") + json.dumps(sample))
        f.write("]")
    tmp.replace(out)
    return out


def tree_rss(proc: psutil.Process) -> int:
    """Proportional set size of the process and its children (shared pages counted once, not per worker)."""
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_full_info().pss
        except psutil.Error:
            pass
    return total


def run(cmd: list[str], env: dict[str, str], done=None, timeout: float = 3600) -> tuple[float, int, int]:
    """(seconds, peak PSS of the process tree in bytes, exit code); stops the tree once `done()` is true."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    ps = psutil.Process(proc.pid)
    peak = 0
    while proc.poll() is None:
        peak = max(peak, tree_rss(ps))
        if done is not None and done():
            elapsed = time.perf_counter() - t0
            for p in [*ps.children(recursive=True), ps]:
                try:
                    p.kill()
                except psutil.Error:
                    pass
            proc.wait()
            return elapsed, peak, 0
        if time.perf_counter() - t0 > timeout:
            proc.kill()
            raise SystemExit(f"timed out after {timeout:.0f} s: {' '.join(cmd)}")
        time.sleep(0.1)
    elapsed = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr.read()[-3000:]}")
    return elapsed, peak, proc.returncode


def first_step_written(output: Path):
    metrics = output / "metrics.jsonl"
    return lambda: metrics.exists() and metrics.stat().st_size > 0


def measure(work: Path, data: Path, mllm: str, cache: Path, tmp: Path) -> dict[str, tuple[float, int]]:
    # a private length cache (XDG_CACHE_HOME), but the usual compiled-extension cache: DeepSpeed's CPU ops are
    # built once per machine, not part of a start-up
    ext = os.environ.get("TORCH_EXTENSIONS_DIR") or os.path.expanduser("~/.cache/torch_extensions")
    env = dict(os.environ, XDG_CACHE_HOME=str(cache), TORCH_EXTENSIONS_DIR=ext)
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    check = [mllm, "data", "check", str(data), "--tokenizer", str(work / "llm")]
    check += ["--no-progress", "--threshold", "100%"]
    check += ["--bad-samples", str(tmp / "bad.jsonl")]
    res = {}
    shutil.rmtree(cache, ignore_errors=True)
    res["data check, cold"] = run(check, env)[:2]
    res["data check, warm"] = run(check, env)[:2]
    shutil.rmtree(cache, ignore_errors=True)
    for kind in ("cold", "warm"):
        out = tmp / f"train_{kind}"
        shutil.rmtree(out, ignore_errors=True)
        train = [mllm, "train", "--stage", "2", "--vision", str(work / "vision"), "--llm", str(work / "llm")]
        train += ["--data", str(data), "--output", str(out), "--micro-batch-size", "8", "--grad-accum", "1"]
        train += ["--max-steps", "1000000", "--save-every", "1000000"]
        res[f"train to step 1, {kind}"] = run(train, env, done=first_step_written(out))[:2]
    return res


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", required=True, type=Path, help="folder built by shared/bench/make_work.py")
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 665_000])
    p.add_argument("--output", type=Path, help="write the figures as JSON here")
    a = p.parse_args(argv)
    mllm = shutil.which("mllm", path=os.path.dirname(sys.executable)) or "mllm"
    rows = {}
    with tempfile.TemporaryDirectory() as td:
        for n in sorted(a.sizes):
            data = write_data(a.work, n)
            print(f"{n:>8,} samples ({data.stat().st_size / 1e6:.0f} MB) ...", flush=True)
            rows[n] = measure(a.work, data, mllm, Path(td) / f"cache{n}", Path(td))
            for what, (sec, rss) in rows[n].items():
                print(f"    {what:<24} {sec:7.1f} s   peak PSS {rss / 1e9:5.2f} GB", flush=True)
    smallest = rows[min(rows)]
    print("\nsamples     " + "  ".join(f"{w:>26}" for w in smallest))
    for n, res in rows.items():
        cells = [
            f"{sec:6.1f} s {rss / 1e9:4.2f} GB (+{(rss - smallest[w][1]) / 1e9:4.2f})"
            for w, (sec, rss) in res.items()
        ]
        print(f"{n:>9,}   " + "  ".join(f"{c:>26}" for c in cells))
    if a.output:
        a.output.write_text(json.dumps({str(n): res for n, res in rows.items()}, indent=1))


if __name__ == "__main__":
    main()
