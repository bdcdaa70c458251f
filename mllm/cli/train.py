"""`mllm train --stage 1|2 ...`: the same run as scripts/pretrain.py and scripts/finetune.py.

Under the launcher: `deepspeed --no_local_rank $(which mllm) train --stage 2 ...` (the launcher would
otherwise put --local_rank before the subcommand; the rank is read from the environment anyway).
"""

from __future__ import annotations

import argparse

from mllm.train.config import add_config_arguments


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_config_arguments(p)
    p.add_argument("--debug", action="store_true", help="show full tracebacks")


def run(args: argparse.Namespace) -> int:
    from mllm.train import resolve_config, train

    options = argparse.Namespace(**{k: v for k, v in vars(args).items() if k not in ("command", "debug")})
    train(resolve_config(options))
    return 0
