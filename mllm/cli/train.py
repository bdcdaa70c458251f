"""`mllm train --stage 1|2 ...`: the same run as scripts/pretrain.py and scripts/finetune.py.

Under the launcher: `deepspeed --no_local_rank $(which mllm) train --stage 2 ...` (the launcher would
otherwise put --local_rank before the subcommand; the rank is read from the environment anyway).
"""

from __future__ import annotations

# Heavy modules (torch, transformers, the model) are imported inside the functions that need them, when the
# command runs: parsing arguments and `--help` stay instant.
import argparse

from mllm.train.config import add_config_arguments


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_config_arguments(p)
    p.add_argument("--debug", action="store_true", help="show full tracebacks")


def run(args: argparse.Namespace) -> int:
    from mllm.cli import UserError
    from mllm.train import resolve_config, train
    from mllm.train.distributed import quiet_library_deprecations
    from mllm.train.nonfinite import NonFiniteTraining
    from mllm.train.stop import exit_code

    quiet_library_deprecations()

    options = argparse.Namespace(**{k: v for k, v in vars(args).items() if k not in ("command", "debug")})
    try:
        return exit_code(train(resolve_config(options)))
    except NonFiniteTraining as e:
        if args.debug:
            raise
        raise UserError(str(e)) from None
