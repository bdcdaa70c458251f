#!/usr/bin/env python3
"""Side-by-side training benchmark: mllm vs transformers' LlavaForConditionalGeneration + Trainer, on the same work.

    python shared/bench/make_work.py WORK            # backbones + LLaVA data (deterministic, offline)
    python scripts/bench.py --work WORK --stage 1 --output stage1.json [--levers]
    python scripts/bench.py --show stage1.json       # print a saved result again

One invocation measures this machine's matmul peak, then runs each side in its
own subprocess (the reference first, then mllm; with `--levers`, mllm once more
per lever switched off), on the same backbones, data, micro-batch and dtype,
and prints samples/s, real tokens/s, padding share, peak RSS and MFU for each,
the ratio mllm / reference and the verdict against the targets.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

STAGE_LR = {1: 1e-3, 2: 2e-5}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", required=True, help="folder built by shared/bench/make_work.py")
    p.add_argument(
        "--stage", type=int, choices=(1, 2), required=True, help="1: projector only; 2: projector + LLM"
    )
    p.add_argument("--output", default=None, help="write the full result as JSON here")
    p.add_argument(
        "--steps",
        type=int,
        default=0,
        help="timed optimizer steps per side; 0 (default) = the rest of one full epoch after warm-up, "
        "so both sides are timed on (almost) the same samples",
    )
    p.add_argument(
        "--lever-steps",
        type=int,
        default=40,
        help="timed steps of each --levers run (same seed: the same batches for every lever run)",
    )
    p.add_argument("--warmup", type=int, default=3, help="steps run first and not timed")
    p.add_argument("--batch-size", type=int, default=8, help="micro-batch (samples per step), both sides")
    p.add_argument(
        "--samples", type=int, default=None, help="use only the first N samples of the stage's data"
    )
    p.add_argument(
        "--dtype",
        choices=("auto", "bf16", "fp32"),
        default="auto",
        help="auto: bf16 where the CPU/GPU runs it natively, else fp32",
    )
    p.add_argument("--levers", action="store_true", help="also run mllm once with each lever off")
    p.add_argument(
        "--disable",
        action="append",
        default=[],
        metavar="LEVER",
        help="switch an mllm lever off in the main comparison (repeatable)",
    )
    p.add_argument(
        "--reference-compile",
        action="store_true",
        help="give the reference Trainer's torch_compile=True (whole-model compile, recompiles per new shape)",
    )
    p.add_argument("--cache-dir", default=None, help="vision feature cache (default: WORK/feature_cache)")
    p.add_argument(
        "--threads", type=int, default=None, help="torch threads per side (default: torch's choice)"
    )
    p.add_argument(
        "--peak-seconds", type=float, default=1.0, help="seconds per matmul size when measuring the peak"
    )
    p.add_argument("--side-timeout", type=int, default=1800, help="seconds before a side is stopped")
    return p.parse_args(argv)


def run_side(args, side: str, dtype: str, off: tuple[str, ...] = (), steps: int | None = None) -> dict:
    """Run one side in a fresh Python process and read back its JSON."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "side.json")
        cmd = [
            sys.executable,
            "-m",
            "mllm.bench.side",
            "--side",
            side,
            "--work",
            args.work,
            "--stage",
            str(args.stage),
            "--steps",
            str(args.steps),
            "--warmup",
            str(args.warmup),
            "--batch-size",
            str(args.batch_size),
            "--lr",
            str(STAGE_LR[args.stage]),
            "--dtype",
            dtype,
            "--out",
            out,
        ]
        if args.samples:
            cmd += ["--samples", str(args.samples)]
        if args.cache_dir:
            cmd += ["--cache-dir", args.cache_dir]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        for lever in off:
            cmd += ["--off", lever]
        if side == "reference" and args.reference_compile:
            cmd += ["--reference-compile"]
        label = side + (f" (off: {', '.join(off)})" if off else "")
        print(f"running {label} ...", file=sys.stderr, flush=True)
        t = time.perf_counter()
        proc = subprocess.run(
            cmd, timeout=args.side_timeout, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        if proc.returncode != 0:
            raise SystemExit(f"{label} failed (exit {proc.returncode}):\n{proc.stdout[-4000:]}")
        with open(out, encoding="utf-8") as f:
            result = json.load(f)
        print(
            f"  {label}: {result['samples_per_s']:.2f} samples/s ({time.perf_counter() - t:.0f} s)",
            file=sys.stderr,
            flush=True,
        )
        return result


def main(argv=None) -> dict:
    if argv is None and len(sys.argv) == 3 and sys.argv[1] == "--show":  # re-print a saved result
        from mllm.bench.report import format_report

        with open(sys.argv[2], encoding="utf-8") as f:
            result = json.load(f)
        print(format_report(result))
        return result
    args = parse_args(argv)
    args.work = os.path.abspath(args.work)
    import torch

    from mllm.bench.flops import FORMULA, measure_matmul_peak, model_sizes
    from mllm.bench.ours import Levers
    from mllm.bench.report import compare, format_report, summarise
    from mllm.bench.work import Work
    from mllm.model.runtime import resolve_runtime

    work = Work(args.work).check()
    unknown = sorted(set(args.disable) - set(Levers.names()))
    if unknown:
        raise SystemExit(f"--disable: unknown lever(s) {unknown}; known: {Levers.names()}")
    runtime = resolve_runtime(args.dtype, "sdpa", device="cpu")
    dtype = "bf16" if runtime.dtype == torch.bfloat16 else "fp32"
    if args.threads:
        torch.set_num_threads(args.threads)
    peak = measure_matmul_peak(runtime.dtype, seconds=args.peak_seconds)
    sizes = model_sizes(work.vision, work.llm)
    summary = lambda raw: summarise(raw, sizes, peak["peak_flops"], args.stage)  # noqa: E731
    ref = summary(run_side(args, "reference", dtype))
    ours = summary(run_side(args, "mllm", dtype, off=tuple(args.disable)))
    result = {
        "stage": args.stage,
        "work": args.work,
        "command": " ".join(
            [os.path.basename(sys.argv[0]) or "bench.py", *(argv if argv is not None else sys.argv[1:])]
        ),
        "batch_size": args.batch_size,
        "steps": args.steps,
        "warmup": args.warmup,
        "machine": {
            "dtype": dtype,
            "threads": torch.get_num_threads(),
            "peak_flops": peak["peak_flops"],
            "peak_by_size": peak["by_size"],
            "cpu_count": os.cpu_count(),
        },
        "flop_formula": FORMULA,
        "model_sizes": sizes.to_dict(),
        "reference": ref,
        "mllm": ours,
        **compare(ours, ref, args.stage),
        "levers": [],
    }
    if args.levers:
        # every lever run, and the all-on run they are compared with, sees the same batches (same seed and steps)
        base = summary(run_side(args, "mllm", dtype, off=tuple(args.disable), steps=args.lever_steps))
        result["levers_base"] = base
        for lever in Levers.names():
            if lever in args.disable:
                continue
            row = summary(run_side(args, "mllm", dtype, off=(lever, *args.disable), steps=args.lever_steps))
            row.update(
                lever=lever,
                description=Levers.describe(lever),
                ratio_vs_all_on=row["samples_per_s"] / base["samples_per_s"],
                mfu_ratio_vs_reference=row["mfu"] / ref["mfu"],
            )
            result["levers"].append(row)
    print(format_report(result))
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
