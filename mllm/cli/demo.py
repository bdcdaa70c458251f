"""`mllm demo --output runs/demo`: the offline two-stage demo on real pretrained backbones, end to end."""

from __future__ import annotations

# Heavy modules (torch, transformers, the model) are imported inside the functions that need them, when the
# command runs: parsing arguments and `--help` stay instant.
import argparse

from mllm.cli import UserError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--output",
        default="runs/demo",
        help="run folder: data/, stage1/, stage2/, eval_{val,test}*/, results.json (validation and test apart)",
    )
    p.add_argument("--connector", choices=["mlp", "qformer", "resampler"], default="mlp")
    p.add_argument(
        "--qformer-pretrain",
        action="store_true",
        help="with --connector qformer, the BLIP-2 route: a Q-Former from all-MiniLM-L6-v2 pretrained on the captions "
        "(stage 0: ITC, ITM, ITG; retrieval figures reported), then stages 1 and 2",
    )
    p.add_argument(
        "--instruction-aware",
        action="store_true",
        help="with --qformer-pretrain, the InstructBLIP route: stage 2 feeds each question into the Q-Former",
    )
    mode = p.add_mutually_exclusive_group()
    mode.add_argument(
        "--quick",
        action="store_true",
        help="16 + 8 steps on 24 images (CI: checks that it learns; ~30 questions, so accuracy means little)",
    )
    mode.add_argument(
        "--full",
        action="store_true",
        help="all 4,000 training images, a long schedule (GPU, or hours on CPU)",
    )
    p.add_argument(
        "--backbones", help="where fetched backbones are cached (default: ~/.cache/mllm/backbones)"
    )
    p.add_argument("--quiet", action="store_true", help="keep the phases' own output in <output>/logs/ only")


def run(args: argparse.Namespace) -> int:
    from mllm.demo import Demo, DemoError, demo_settings

    schedule = "quick" if args.quick else "full" if args.full else "default"
    try:
        Demo(
            args.output,
            demo_settings(schedule, args.connector, args.qformer_pretrain, args.instruction_aware),
            args.backbones,
            stream=not args.quiet,
        ).run()
    except DemoError as e:
        raise UserError(str(e)) from None
    return 0
