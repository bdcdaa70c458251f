"""Command-line options shared by the commands that load a checkpoint or read data (chat, eval, export, serve, data): one definition each."""

from __future__ import annotations

import argparse

from mllm.cli import UserError

TRUST_REMOTE_CODE_HELP = (
    "run Python code shipped inside the checkpoint's vision/LLM model folders (transformers' trust_remote_code); "
    "off by default, and a checkpoint's own config cannot turn it on"
)


def add_trust_remote_code(p: argparse.ArgumentParser) -> None:
    """`--trust-remote-code` (→ `args.trust_remote_code`, False unless given); pass it to `load_pretrained`."""
    p.add_argument("--trust-remote-code", action="store_true", help=TRUST_REMOTE_CODE_HELP)


def add_image_root(p: argparse.ArgumentParser) -> None:
    """`--image-root` / `--image-folder` (→ `args.image_root`, None unless given); pass it to `load_recipe`.

    `mllm train` has the same option, derived from `TrainConfig.image_root`.
    """
    p.add_argument(
        "--image-root",
        "--image-folder",
        dest="image_root",
        help="folder the data's image paths resolve against (default: the recipe's image_root; for a bare "
        ".json/.jsonl file, its own folder); paths may not leave it",
    )


def add_no_verify(p: argparse.ArgumentParser) -> None:
    """`--no-verify` (→ `args.no_verify`): skip hashing the checkpoint's weight files against its manifest."""
    p.add_argument(
        "--no-verify",
        action="store_true",
        help="do not check the checkpoint's weight files against the hashes recorded when they were saved "
        "(hashing adds ~10%% to reading them; see docs/reliability.md). Sizes are still checked, and "
        "every weight must still be finite",
    )


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """The checkpoint and how to load it: shared by `mllm chat`, `mllm serve` and `mllm eval`."""
    p.add_argument(
        "checkpoint", help="checkpoint directory (or a training output directory: its newest checkpoint)"
    )
    p.add_argument("--load-4bit", action="store_true", help="load the LLM in 4-bit (bitsandbytes NF4)")
    p.add_argument(
        "--keep-adapters",
        action="store_true",
        help="run LoRA adapters unmerged (default: folded into the bf16/fp32 base in memory, which runs faster)",
    )
    p.add_argument(
        "--dtype", choices=["auto", "fp32", "bf16", "fp16"], help="override the checkpoint's compute dtype"
    )
    p.add_argument("--device", help="cpu, cuda, cuda:1 … (default: cuda when available)")
    add_trust_remote_code(p)
    add_no_verify(p)
    p.add_argument("--debug", action="store_true", help="show tracebacks")


def load_model(args: argparse.Namespace):
    """`(model, processor)` for the options of `add_model_arguments`; a bad checkpoint is a one-line UserError."""
    # imported when a command runs, not when its options are built: `--help` stays instant
    from mllm.checkpoint import CheckpointError
    from mllm.inference import load_pretrained

    try:
        return load_pretrained(
            args.checkpoint,
            dtype=args.dtype,
            device=args.device,
            load_4bit=args.load_4bit,
            merge_adapters=not args.keep_adapters,
            trust_remote_code=args.trust_remote_code,
            verify_hashes=not args.no_verify,
        )
    except CheckpointError as e:
        raise UserError(str(e)) from None
