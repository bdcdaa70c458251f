"""Options that several commands share, defined once."""

from __future__ import annotations

import argparse


def add_no_verify(p: argparse.ArgumentParser) -> None:
    """`--no-verify` (→ `args.no_verify`): skip hashing the checkpoint's weight files against its manifest."""
    p.add_argument(
        "--no-verify",
        action="store_true",
        help="do not check the checkpoint's weight files against the hashes recorded when they were saved "
        "(hashing adds ~10%% to reading them; see README, Reliability). Sizes are still checked, and "
        "every weight must still be finite",
    )
