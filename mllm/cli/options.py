"""Command-line options shared by the commands that load a checkpoint or read data (chat, eval, export, serve, data): one definition each."""

from __future__ import annotations

import argparse

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
