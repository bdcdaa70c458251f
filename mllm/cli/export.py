"""`mllm export CKPT OUT --merge-lora | --format hf-llava | hf-llava-next | hf-blip2 | hf-instructblip`."""

from __future__ import annotations

# Heavy modules (torch, transformers, the model) are imported inside the functions that need them, when the
# command runs: parsing arguments and `--help` stay instant.
import argparse

from mllm.cli import UserError
from mllm.cli.options import add_no_verify, add_trust_remote_code


def add_arguments(p: argparse.ArgumentParser) -> None:
    from mllm.export import EXPORT_FORMATS

    p.add_argument(
        "checkpoint", help="checkpoint directory (or a training output directory: its newest checkpoint)"
    )
    p.add_argument("out", help="new, empty output directory")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument(
        "--merge-lora",
        action="store_true",
        help="fold LoRA adapters into the LLM: a standalone mllm checkpoint",
    )
    what.add_argument(
        "--format",
        choices=EXPORT_FORMATS.names(),
        help="; ".join(f"{name}: {EXPORT_FORMATS.get(name).help}" for name in EXPORT_FORMATS.names()),
    )
    p.add_argument(
        "--dtype", choices=["fp32", "bf16", "fp16"], default="fp32", help="weights dtype of the export"
    )
    add_trust_remote_code(p)
    add_no_verify(p)
    p.add_argument("--debug", action="store_true", help="show tracebacks")


def run(args: argparse.Namespace) -> int:
    from mllm.checkpoint import CheckpointError, read_config
    from mllm.config import ModelConfig
    from mllm.export import EXPORT_FORMATS, ExportError, merge_lora, write_merged_checkpoint
    from mllm.export.jinja import template_jinja
    from mllm.inference import load_pretrained

    fmt = EXPORT_FORMATS.get(args.format) if args.format else None
    try:
        saved = read_config(args.checkpoint)
        mode = saved["model"]["llm"]["mode"]
        if args.merge_lora and mode not in ("lora", "qlora"):
            raise UserError(
                f"the checkpoint's LLM is trained in mode {mode!r}: it has no LoRA adapters to merge"
            )
        if fmt is not None:
            fmt.check(ModelConfig.from_dict(saved["model"]))  # refuse before seconds of loading
        # A QLoRA checkpoint's adapters are merged into the full-precision base, never into 4-bit weights.
        model, processor = load_pretrained(
            args.checkpoint,
            dtype=args.dtype,
            full_precision_base=True,
            trust_remote_code=args.trust_remote_code,
            verify_hashes=not args.no_verify,
        )
    except CheckpointError as e:
        raise UserError(str(e)) from None
    except ExportError as e:
        raise UserError(str(e)) from None
    try:
        if args.merge_lora:
            merge_lora(model)
            out = write_merged_checkpoint(model, processor.config, args.out)
        else:
            jinja = template_jinja(processor.template, processor.tokenizer)
            out = fmt.write(model, processor.config, processor.tokenizer, jinja, args.out)
    except ExportError as e:
        raise UserError(str(e)) from None
    print(out)
    return 0
