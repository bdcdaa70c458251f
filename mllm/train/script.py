"""Shared `main()` of scripts/pretrain.py and scripts/finetune.py (the deepspeed launcher adds --local_rank)."""

from __future__ import annotations

import argparse
import logging
import sys

from mllm.train.config import add_config_arguments, resolve_config
from mllm.train.distributed import quiet_library_deprecations
from mllm.train.stop import exit_code


def main(stage: int, description: str | None = None, argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_config_arguments(parser, include_stage=False)
    parser.add_argument(
        "--local_rank", "--local-rank", type=int, default=-1, help=argparse.SUPPRESS
    )  # from `deepspeed`
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    args = parser.parse_args(argv)
    debug = args.debug
    del args.local_rank, args.debug
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    quiet_library_deprecations()
    # imported once the filters are set: the training stack warns at import time
    from mllm.train.loop import train
    from mllm.train.nonfinite import NonFiniteTraining

    try:
        summary = train(resolve_config(args, stage=stage))
    except (ValueError, FileNotFoundError, NonFiniteTraining) as e:
        if debug:
            raise
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 2
    return exit_code(summary)
