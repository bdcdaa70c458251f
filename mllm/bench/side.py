"""One side of the bench in its own process (so its peak RSS is its own): `python -m mllm.bench.side ...`.

scripts/bench.py launches it: alone, or under a launcher for several processes (the mllm side under `deepspeed`,
the reference under `torchrun`); every process writes its own measurements as JSON to `--out` (`.rankN` added
when there are several). Both sides get their run settings from the same `TrainConfig` (`mllm.bench.product`).
"""

from __future__ import annotations

import argparse
import json
import logging
import os

SIDES = ("reference", "mllm")


def parse_args(argv=None) -> argparse.Namespace:
    from mllm.bench.rows import ROWS

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--side", choices=SIDES, required=True)
    p.add_argument("--work", required=True)
    p.add_argument("--row", choices=list(ROWS), required=True)
    p.add_argument(
        "--recipe", required=True, help="data recipe both sides read (mllm.bench.work.write_recipe)"
    )
    p.add_argument("--output", required=True, help="the mllm run's output folder (nothing is checkpointed)")
    p.add_argument(
        "--steps", type=int, required=True, help="optimizer steps in all, warm-up included; 0 = one epoch"
    )
    p.add_argument("--warmup", type=int, required=True)
    p.add_argument("--batch-size", type=int, required=True)
    p.add_argument("--dtype", choices=("bf16", "fp32"), required=True)
    p.add_argument("--zero", default="", help="mllm side: DeepSpeed config (default: mllm train's ZeRO-2)")
    p.add_argument("--mllm-set", action="append", default=[], metavar="KEY=VALUE", help="mllm train option")
    p.add_argument(
        "--reference", default="", help="reference settings, e.g. attention=sdpa,workers=1,compile=off"
    )
    p.add_argument(
        "--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)"
    )
    p.add_argument("--out", required=True)
    p.add_argument(
        "--local_rank", "--local-rank", type=int, default=-1, help=argparse.SUPPRESS
    )  # deepspeed's
    return p.parse_args(argv)


def main(argv=None) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    import torch

    from mllm.bench.product import parse_settings, run_mllm, train_config
    from mllm.bench.reference import ReferenceSettings, run_reference
    from mllm.bench.rows import get_row
    from mllm.bench.work import Work

    a = parse_args(argv)
    work = Work(a.work).check()
    if a.threads:
        torch.set_num_threads(a.threads)
    cfg = train_config(
        work,
        get_row(a.row),
        a.recipe,
        a.output,
        a.steps,
        a.batch_size,
        a.dtype,
        zero=a.zero,
        overrides=parse_settings(a.mllm_set),
    )
    if a.side == "reference":
        dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[a.dtype]
        result = run_reference(work, cfg, a.warmup, ReferenceSettings.parse(a.reference), dtype)
    else:
        from mllm.train.distributed import quiet_library_deprecations

        quiet_library_deprecations()
        result = run_mllm(cfg, a.warmup)
    result["threads"] = torch.get_num_threads()
    out = a.out if result["world_size"] == 1 else f"{a.out}.rank{result['rank']}"
    with open(out, "w", encoding="utf-8") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
