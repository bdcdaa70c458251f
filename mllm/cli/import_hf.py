"""`mllm import SRC OUT`: a transformers BLIP-2 / InstructBLIP directory → an mllm checkpoint to fine-tune or chat with."""

from __future__ import annotations

# Heavy modules (torch, transformers, the model) are imported inside the functions that need them, when the
# command runs: parsing arguments and `--help` stay instant.
import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "source", help="a Blip2ForConditionalGeneration or InstructBlipForConditionalGeneration directory"
    )
    p.add_argument("out", help="new, empty output directory: the checkpoint (its LLM in OUT/llm)")
    p.add_argument(
        "--template",
        default="auto",
        help="chat template the checkpoint is prompted with (auto = the LLM tokenizer's; BLIP-2's OPT has none)",
    )
    p.add_argument("--debug", action="store_true", help="show tracebacks")


def run(args: argparse.Namespace) -> int:
    from mllm.export import import_hf_blip2

    print(import_hf_blip2(args.source, args.out, template=args.template))
    return 0
