"""The `mllm` command. Each subcommand lives in its own module with `add_arguments(parser)` and `run(args)`."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# subcommand → (module, one-line help). Modules are imported only when their command runs.
COMMANDS: dict[str, tuple[str, str]] = {
    "backbones": ("mllm.cli.backbones", "make tiny offline HF backbones, or fetch the real SmolLM2"),
    "data": (
        "mllm.cli.data",
        "check a data recipe before training, or show samples with their supervised spans",
    ),
    "train": ("mllm.cli.train", "train stage 1 (alignment) or stage 2 (instruction tuning)"),
    "chat": ("mllm.cli.chat", "chat with a trained checkpoint (interactive or one-shot)"),
    "serve": ("mllm.cli.serve", "serve a checkpoint: OpenAI-compatible API and a web chat page"),
    "eval": ("mllm.cli.eval", "evaluate a checkpoint on question-answer or caption data"),
    "export": (
        "mllm.cli.export",
        "merge LoRA, or export to the transformers LLaVA / BLIP-2 / InstructBLIP format",
    ),
    "import": ("mllm.cli.import_hf", "a transformers BLIP-2 / InstructBLIP checkpoint → an mllm checkpoint"),
    "demo": ("mllm.cli.demo", "the offline two-stage demo on real pretrained backbones"),
}


class UserError(Exception):
    """An error whose message is the whole story: printed as one line, no traceback."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="mllm", description="Train and chat with LLaVA-style multimodal LLMs."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    argv = sys.argv[1:] if argv is None else argv
    chosen = argv[0] if argv and argv[0] in COMMANDS else None
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:
            importlib.import_module(module).add_arguments(p)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not getattr(args, "debug", False):  # --debug: every library's every line, as they print them
        from mllm.cli.quiet import quiet_libraries

        quiet_libraries()
    try:
        return importlib.import_module(COMMANDS[args.command][0]).run(args) or 0
    except (UserError, FileNotFoundError, ValueError, KeyError) as e:
        if getattr(args, "debug", False):
            raise
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"mllm {args.command}: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
