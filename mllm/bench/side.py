"""One side of the bench in its own process (so its peak RSS is its own): `python -m mllm.bench.side ...`.

Writes the side's measurements as JSON to `--out`. `scripts/bench.py` launches
the reference and the mllm side this way, one after the other.
"""

from __future__ import annotations

import argparse
import json
import logging
import os

SIDES = ("reference", "mllm")


def parse_args(argv=None) -> argparse.Namespace:
    from mllm.bench.ours import Levers

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--side", choices=SIDES, required=True)
    p.add_argument("--work", required=True)
    p.add_argument("--stage", type=int, choices=(1, 2), required=True)
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--warmup", type=int, required=True)
    p.add_argument("--batch-size", type=int, required=True)
    p.add_argument("--lr", type=float, required=True)
    p.add_argument("--dtype", choices=("bf16", "fp32"), required=True)
    p.add_argument("--samples", type=int, default=None)
    p.add_argument("--cache-dir", default=None)
    p.add_argument(
        "--off", action="append", default=[], choices=Levers.names(), help="switch a lever off (mllm side)"
    )
    p.add_argument(
        "--reference-compile", action="store_true", help="reference side: Trainer's torch_compile=True"
    )
    p.add_argument(
        "--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)"
    )
    p.add_argument("--out", required=True)
    return p.parse_args(argv)


def main(argv=None) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    import torch

    from mllm.bench.ours import Levers, run_mllm
    from mllm.bench.reference import run_reference
    from mllm.bench.work import Work

    a = parse_args(argv)
    work = Work(a.work).check()
    if a.threads:
        torch.set_num_threads(a.threads)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[a.dtype]
    common = dict(
        work=work,
        stage=a.stage,
        steps=a.steps,
        warmup=a.warmup,
        batch_size=a.batch_size,
        lr=a.lr,
        dtype=dtype,
        samples=a.samples,
    )
    if a.side == "reference":
        result = run_reference(**common, compile=a.reference_compile)
    else:
        levers = Levers(**{name: False for name in a.off})
        result = run_mllm(
            **common, levers=levers, cache_dir=a.cache_dir or os.path.join(a.work, "feature_cache")
        )
    with open(a.out, "w", encoding="utf-8") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
