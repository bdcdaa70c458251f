#!/usr/bin/env python3
"""Side-by-side training benchmark: `mllm train` vs transformers' LlavaForConditionalGeneration + Trainer.

    python shared/bench/make_work.py WORK             # backbones + LLaVA data (deterministic, offline)
    python scripts/bench.py --work WORK --steps 20 --output bench.json
    python scripts/bench.py --work WORK --rows lora --nprocs 2 --steps 20
    python scripts/bench.py --quick                   # CI: a tiny work, one round, a few steps
    python scripts/bench.py --show bench.json         # print a saved result again

The mllm side is `mllm train` itself (`mllm.train.loop.setup` + `train_step`: the same DeepSpeed engine,
optimizer, sampler, collator and defaults; no checkpoints). The reference gets what a competent transformers user
turns on (SDPA or eager, bf16, group_by_length on precomputed lengths, fused AdamW, 0-2 dataloader workers,
torch_compile on or off: the uncertain ones are each measured in short runs and the fastest kept). For each row
(stage 1 connector only; stage 2 full LLM; stage 2 LoRA on both sides) one invocation alternates the sides
(reference, mllm, reference, mllm, …), each run in a fresh process on a fresh output folder (caches cold), and
reports the median mllm / reference ratio with its min–max, peak RSS, MFU, and the verdict against the targets;
then one more pair on the same output folder again (caches warm), reported apart.
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

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_ROWS = ("stage1", "full", "lora")
QUICK_REFERENCE = "attention=sdpa,workers=0,compile=off"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--work", default=None, help="folder built by shared/bench/make_work.py (--quick: a tiny one)"
    )
    p.add_argument(
        "--rows", default=",".join(DEFAULT_ROWS), help=f"comma-separated, of {', '.join(DEFAULT_ROWS)}"
    )
    p.add_argument("--rounds", type=int, default=3, help="alternating reference/mllm pairs per row")
    p.add_argument(
        "--steps",
        type=int,
        default=20,
        help="timed optimizer steps per run; 0 = one full epoch (both sides then train on the same samples; "
        "short runs time different length groups on each side: read the MFU ratio beside samples/s)",
    )
    p.add_argument("--warmup", type=int, default=3, help="steps run first and not timed")
    p.add_argument(
        "--batch-size", type=int, default=8, help="micro-batch (samples per process per step), both sides"
    )
    p.add_argument(
        "--samples", type=int, default=None, help="use only the first N samples of each stage's data"
    )
    p.add_argument(
        "--nprocs",
        type=int,
        default=1,
        help="processes per side: mllm under `deepspeed --num_gpus N` "
        "(ZeRO-3 when N > 1), the reference under torchrun (DDP)",
    )
    p.add_argument(
        "--dtype",
        choices=("auto", "bf16", "fp32"),
        default="auto",
        help="auto: bf16 where the CPU/GPU runs it natively, else fp32",
    )
    p.add_argument(
        "--reference",
        default="auto",
        help="`auto`: measure the reference's uncertain settings and keep "
        "the fastest; or fixed ones, e.g. attention=sdpa,workers=1,compile=off",
    )
    p.add_argument("--tune-steps", type=int, default=8, help="timed steps of each reference tuning run")
    p.add_argument("--no-warm", dest="warm", action="store_false", help="skip the warm-cache pair")
    p.add_argument(
        "--mllm-set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an `mllm train` option for the mllm side (repeatable), e.g. num_workers=1; `{output}` in VALUE = "
        "the run's output folder (fresh per run, reused by the warm pair): feature_cache={output}/features",
    )
    p.add_argument(
        "--zero",
        default=None,
        help="mllm side DeepSpeed config (default: mllm train's ZeRO-2 for one "
        "process, zero_configs/z3.json for several)",
    )
    p.add_argument(
        "--threads", type=int, default=None, help="torch threads per process (default: cores / nprocs)"
    )
    p.add_argument(
        "--peak-seconds", type=float, default=1.0, help="seconds per matmul size when measuring the peak"
    )
    p.add_argument("--side-timeout", type=int, default=1800, help="seconds before a side is stopped")
    p.add_argument(
        "--quick",
        action="store_true",
        help="CI: tiny work (unless --work), 1 round, 2 timed steps, "
        f"reference fixed to {QUICK_REFERENCE}, no warm pair",
    )
    p.add_argument("--output", default=None, help="write the full result as JSON here")
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.steps, args.warmup, args.warm = 1, 2, 1, False
        args.tune_steps, args.peak_seconds = 1, min(args.peak_seconds, 0.05)
        if args.reference == "auto":
            args.reference = QUICK_REFERENCE
    if args.work is None and not args.quick:
        p.error("--work is required (or --quick, which builds a tiny work)")
    if args.rounds < 1 or args.steps < 0 or args.warmup < 1 or args.nprocs < 1:
        p.error("--rounds, --warmup and --nprocs must be >= 1, --steps >= 0")
    return args


class Bench:
    """One invocation: the work, a scratch folder, how each side is launched."""

    def __init__(self, args, work, dtype: str, scratch: str):
        self.args, self.work, self.dtype, self.scratch = args, work, dtype, scratch
        self.runs = 0
        cores = os.cpu_count() or 1
        self.threads = args.threads or max(1, cores // args.nprocs)
        self.zero = args.zero
        if self.zero is None:
            self.zero = str(ROOT / "zero_configs" / "z3.json") if args.nprocs > 1 else ""

    def launcher(self, side: str) -> list[str]:
        n = self.args.nprocs
        if n == 1:
            return [sys.executable, "-m", "mllm.bench.side"]
        port = str(29500 + (os.getpid() + self.runs) % 2000)
        if side == "mllm":  # as users launch `mllm train` on several devices
            beside = Path(sys.executable).with_name("deepspeed")
            ds = str(beside) if beside.is_file() else (shutil.which("deepspeed") or "deepspeed")
            return [ds, "--num_gpus", str(n), "--master_port", port, "--module", "mllm.bench.side"]
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n), "--master_port", port,
                "-m", "mllm.bench.side"]  # fmt: skip

    def run(
        self, side: str, row: str, recipe: str, steps: int, reference: str = "", output: str | None = None
    ):
        """One side in fresh process(es); returns (merged raw result, the mllm output folder used)."""
        from mllm.bench.report import merge_ranks

        a = self.args
        self.runs += 1
        output = output or os.path.join(self.scratch, f"run{self.runs}-{side}-{row}")
        out = os.path.join(self.scratch, f"run{self.runs}.json")
        cmd = self.launcher(side) + [
            "--side", side, "--work", self.work.root, "--row", row, "--recipe", recipe, "--output", output,
            "--steps", str(a.warmup + steps if steps else 0), "--warmup", str(a.warmup), "--batch-size", str(a.batch_size),
            "--dtype", self.dtype, "--threads", str(self.threads), "--out", out,
        ]  # fmt: skip
        if side == "reference":
            cmd += ["--reference", reference]
        else:
            cmd += ["--zero", self.zero] + [
                f"--mllm-set={kv.replace('{output}', output)}" for kv in a.mllm_set
            ]
        env = {**os.environ, "OMP_NUM_THREADS": str(self.threads), "PYTHONPATH": _pythonpath()}
        env.setdefault("HF_HUB_OFFLINE", "1")
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        label = f"{row}: {side}" + (f" ({reference})" if reference else "")
        print(f"running {label} ...", file=sys.stderr, flush=True)
        t = time.perf_counter()
        proc = subprocess.run(cmd, env=env, cwd=ROOT, timeout=a.side_timeout, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)  # fmt: skip
        if proc.returncode != 0:
            raise SystemExit(f"{label} failed (exit {proc.returncode}):\n{proc.stdout[-4000:]}")
        files = [out] if a.nprocs == 1 else [f"{out}.rank{r}" for r in range(a.nprocs)]
        raw = merge_ranks([json.loads(Path(f).read_text()) for f in files])
        raw["process_wall_s"] = time.perf_counter() - t
        print(f"  {label}: {raw['samples_per_s']:.2f} samples/s ({raw['process_wall_s']:.0f} s)", file=sys.stderr,
              flush=True)  # fmt: skip
        return raw, output


def _pythonpath() -> str:
    """This checkout first, so the side processes import the same mllm as this script."""
    return os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)


def tune_reference(bench: Bench, row: str, recipe: str) -> tuple[str, list[dict]]:
    """The reference's fastest settings for this row (`fastest_settings`), each tried in a short run."""
    from mllm.bench.reference import fastest_settings

    def measure(settings) -> float:
        raw, _ = bench.run("reference", row, recipe, bench.args.tune_steps, reference=settings.text())
        return raw["samples_per_s"]

    best, tried = fastest_settings(measure)
    return best.text(), tried


def run_row(bench: Bench, name: str, recipes: dict, summary) -> dict:
    from mllm.bench.reference import ReferenceSettings
    from mllm.bench.report import ratios, row_verdict
    from mllm.bench.rows import get_row

    a, row = bench.args, get_row(name)
    recipe = recipes[row.stage]
    tuning: list[dict] = []
    reference = a.reference
    if reference == "auto":
        reference, tuning = tune_reference(bench, name, recipe)
    settings = ReferenceSettings.parse(reference)
    llm_trained = row.llm_mode != "frozen"
    rounds, first_output = [], None
    for _ in range(a.rounds):
        ref = summary(bench.run("reference", name, recipe, a.steps, reference=reference)[0], llm_trained)
        raw, output = bench.run("mllm", name, recipe, a.steps)
        first_output = first_output or output
        ours = summary(raw, llm_trained)
        rounds.append({"reference": ref, "mllm": ours, "ratio": ratios(ours, ref)})
    result = {
        "description": row.description,
        "stage": row.stage,
        "llm_mode": row.llm_mode,
        "reference_settings": settings.to_dict(),
        "tuning": tuning,
        "rounds": rounds,
        "verdict": row_verdict(name, rounds),
    }
    if (
        a.warm
    ):  # the same runs again: the reference's images in the page cache, mllm's first output folder reused
        ref = summary(bench.run("reference", name, recipe, a.steps, reference=reference)[0], llm_trained)
        ours = summary(bench.run("mllm", name, recipe, a.steps, output=first_output)[0], llm_trained)
        result["warm"] = {"reference": ref, "mllm": ours, "ratio": ratios(ours, ref)}
    return result


def main(argv=None) -> dict:
    if argv is None and len(sys.argv) == 3 and sys.argv[1] == "--show":  # re-print a saved result
        from mllm.bench.report import format_report

        result = json.loads(Path(sys.argv[2]).read_text())
        print(format_report(result))
        return result
    args = parse_args(argv)
    import torch

    from mllm.bench.flops import FORMULA, measure_matmul_peak, model_sizes
    from mllm.bench.report import format_report, summarise
    from mllm.bench.rows import get_row
    from mllm.bench.work import Work, write_recipe
    from mllm.model.runtime import resolve_runtime

    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    for name in rows:
        get_row(name)  # an unknown row fails before anything runs
    with tempfile.TemporaryDirectory(prefix="mllm-bench-") as scratch:
        if args.work is None:
            from mllm.bench.tiny_work import make_tiny_work

            args.work = make_tiny_work(os.path.join(scratch, "work"), samples=16)
        work = Work(os.path.abspath(args.work)).check()
        runtime = resolve_runtime(args.dtype, "sdpa", device="cpu")
        dtype = "bf16" if runtime.dtype == torch.bfloat16 else "fp32"
        peak = measure_matmul_peak(runtime.dtype, seconds=args.peak_seconds)
        sizes = model_sizes(work.vision, work.llm)
        bench = Bench(args, work, dtype, scratch)
        recipes = {s: write_recipe(work, s, scratch, args.samples) for s in {get_row(n).stage for n in rows}}
        summary = lambda raw, trained: summarise(raw, sizes, peak["peak_flops"], trained)  # noqa: E731
        result = {
            "command": " ".join(["scripts/bench.py", *(argv if argv is not None else sys.argv[1:])]),
            "date": time.strftime("%Y-%m-%d %H:%M"),
            "work": work.root,
            "batch_size": args.batch_size,
            "steps": args.steps,
            "warmup": args.warmup,
            "rounds": args.rounds,
            "nprocs": args.nprocs,
            "machine": {
                "dtype": dtype,
                "threads_per_process": bench.threads,
                "peak_flops": peak["peak_flops"],
                "peak_by_size": peak["by_size"],
                "cpu_count": os.cpu_count(),
            },
            "flop_formula": FORMULA,
            "model_sizes": sizes.to_dict(),
            "rows": {},
        }
        for name in rows:
            result["rows"][name] = run_row(bench, name, recipes, summary)
            if args.output:  # after every row: a long bench stopped midway keeps the rows it finished
                Path(args.output).write_text(json.dumps(result, indent=1))
    print(format_report(result))
    return result


if __name__ == "__main__":
    main()
