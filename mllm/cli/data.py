"""`mllm data check RECIPE` (pre-flight validation) and `mllm data show RECIPE --n 3` (samples, supervised spans marked)."""

from __future__ import annotations

# Heavy modules (torch, transformers, the model) are imported inside the functions that need them, when the
# command runs: parsing arguments and `--help` stay instant.
import argparse
import os
import sys

from mllm.cli import UserError
from mllm.cli.options import add_image_root

DEFAULT_IMAGE_TOKENS = 576
"""LLaVA-1.5's CLIP ViT-L/14 at 336 px: 24 × 24 patches per image."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", required=True)
    check = sub.add_parser(
        "check", help="read every sample and image; report problems; exit 1 above --threshold"
    )
    show = sub.add_parser("show", help="print samples as the model sees them, supervised spans marked")
    for q in (check, show):
        q.add_argument("recipe", help="recipe YAML, or a bare data file (.json/.jsonl, webdataset shards …)")
        q.add_argument("--tokenizer", required=True, help="the LLM's tokenizer (HF directory or id)")
        q.add_argument(
            "--image-tokens",
            type=int,
            default=DEFAULT_IMAGE_TOKENS,
            help=f"tokens per image of your vision tower + connector (default {DEFAULT_IMAGE_TOKENS})",
        )
        q.add_argument(
            "--image-aspect",
            choices=("square", "pad", "anyres"),
            default="square",
            help="how images meet the tower (the model's vision.image_aspect); with anyres, --image-tokens is "
            "the tokens per tile and --tile-size the tower's input side",
        )
        q.add_argument("--tile-size", type=int, default=336, help="the tower's input side in pixels (336)")
        q.add_argument("--max-tiles", type=int, default=4, help="anyres: most tiles per image (4)")
        q.add_argument("--min-pixels", type=int, default=0, help="upscale smaller images to this many pixels")
        q.add_argument(
            "--max-pixels", type=int, default=0, help="downscale larger images to this many pixels"
        )
        q.add_argument(
            "--max-image-tokens", type=int, default=0, help="refuse samples whose images need more tokens"
        )
        q.add_argument("--template", help="override the recipe's template")
        q.add_argument("--max-length", type=int, help="override the recipe's max_length")
        add_image_root(q)
        q.add_argument("--seed", type=int, default=0, help="seed of `random:N` subsets (as in training)")
        q.add_argument("--debug", action="store_true", help="show tracebacks")
    check.add_argument("--workers", type=int, help="reader processes (default: up to 8 for large data)")
    check.add_argument(
        "--threshold",
        default="0",
        help="bad samples allowed before exiting non-zero: a count or a percentage like 0.5%% (default 0)",
    )
    check.add_argument(
        "--bad-samples",
        metavar="JSONL",
        help="write one line per bad sample here (default: <recipe name>.bad_samples.jsonl)",
    )
    check.add_argument("--no-progress", action="store_true")
    show.add_argument("--n", type=int, default=3, help="how many samples (default 3)")
    show.add_argument(
        "--start", type=int, default=0, help="first sample (position in the recipe's selection)"
    )


def _tokenizer(path: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except OSError as e:
        raise UserError(f"cannot load tokenizer {path!r}: {e}") from None


def _layout(args):
    """The image layout the options describe (as a model with these vision settings would have it)."""
    from mllm.config import VisionConfig
    from mllm.data.layout import layout_for

    try:
        cfg = VisionConfig(
            image_aspect=args.image_aspect,
            max_tiles=args.max_tiles,
            min_pixels=args.min_pixels,
            max_pixels=args.max_pixels,
            max_image_tokens=args.max_image_tokens,
        )
        return layout_for(cfg, args.tile_size, args.image_tokens)
    except ValueError as e:
        raise UserError(str(e)) from None


def _recipe(args):
    from mllm.data import load_recipe

    return load_recipe(
        args.recipe, template=args.template, max_length=args.max_length, image_root=args.image_root
    )


def _allowed(threshold: str, total: int) -> float:
    try:
        return float(threshold[:-1]) / 100 * total if threshold.endswith("%") else float(threshold)
    except ValueError:
        raise UserError(f"--threshold must be a count or a percentage, got {threshold!r}") from None


def run_check(args) -> int:
    from mllm.data.check import check_recipe, write_bad_samples

    recipe = _recipe(args)
    report = check_recipe(
        recipe,
        _tokenizer(args.tokenizer),
        _layout(args),
        seed=args.seed,
        workers=args.workers,
        progress=not args.no_progress,
    )
    print(report.format())
    out = args.bad_samples or f"{recipe.name}.bad_samples.jsonl"
    write_bad_samples(report, out)
    allowed = _allowed(args.threshold, report.total)
    print(f"\nbad-sample list: {os.path.abspath(out)} ({len(report.bad)} line(s))")
    if len(report.bad) > allowed:
        print(f"FAILED: {len(report.bad)} bad sample(s) > threshold {args.threshold}", file=sys.stderr)
        return 1
    print("OK")
    return 0


def run_show(args) -> int:
    from mllm.data.show import show_samples

    recipe = _recipe(args)
    color = sys.stdout.isatty() and not os.environ.get("NO_COLOR")
    print(
        show_samples(
            recipe,
            _tokenizer(args.tokenizer),
            _layout(args),
            n=args.n,
            start=args.start,
            seed=args.seed,
            color=color,
        )
    )
    return 0


def run(args: argparse.Namespace) -> int:
    return run_check(args) if args.action == "check" else run_show(args)
