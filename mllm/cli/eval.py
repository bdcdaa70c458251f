"""`mllm eval CKPT --data FILE_OR_RECIPE`: batched generation over QA or caption data, scores and predictions."""

from __future__ import annotations

import argparse
import logging

from mllm.cli import UserError
from mllm.cli.options import add_image_root, add_no_verify, add_trust_remote_code

log = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "checkpoint", help="checkpoint directory (or a training output directory: its newest checkpoint)"
    )
    p.add_argument(
        "--data",
        required=True,
        help="a data file (LLaVA JSON/JSONL, webdataset shards …) or a data recipe YAML",
    )
    add_image_root(p)
    p.add_argument("--output", help="directory for predictions.jsonl and scores.json")
    p.add_argument(
        "--metric",
        choices=["auto", "qa", "caption"],
        default="auto",
        help="auto: caption when references are long",
    )
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--limit", type=int, help="evaluate only the first N samples")
    p.add_argument(
        "--swap-images", action="store_true", help="blind control: show each sample another sample's image"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the --swap-images derangement")
    p.add_argument(
        "--dtype", choices=["auto", "fp32", "bf16", "fp16"], help="override the checkpoint's compute dtype"
    )
    p.add_argument("--device", help="cpu, cuda, cuda:1 … (default: cuda when available)")
    p.add_argument("--load-4bit", action="store_true")
    p.add_argument(
        "--keep-adapters",
        action="store_true",
        help="run LoRA adapters unmerged (default: folded into the bf16/fp32 base in memory, ~1.75x faster on CPU)",
    )
    p.add_argument("--no-progress", action="store_true")
    add_trust_remote_code(p)
    add_no_verify(p)
    p.add_argument("--debug", action="store_true", help="show tracebacks")


def run(args: argparse.Namespace) -> int:
    from mllm.checkpoint import CheckpointError
    from mllm.eval.data import load_eval_items, swap_images
    from mllm.eval.runner import (
        detect_metric,
        format_scores,
        predict,
        prediction_records,
        score,
        write_results,
    )
    from mllm.inference import SamplingConfig, load_pretrained

    if args.batch_size < 1:
        raise UserError("--batch-size must be >= 1")
    items = load_eval_items(args.data, limit=args.limit, image_root=args.image_root)
    if args.swap_images:
        items = swap_images(items, seed=args.seed)
    metric = detect_metric(items) if args.metric == "auto" else args.metric
    try:
        model, processor = load_pretrained(
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
    sampling = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=0.0)
    predictions = predict(model, processor, items, sampling, args.batch_size, progress=not args.no_progress)
    scores = score(items, predictions, metric)
    scores["run"] = {
        "checkpoint": processor.config.get("_path", args.checkpoint),
        "data": args.data,
        "metric": metric,
        "swap_images": args.swap_images,
        "seed": args.seed if args.swap_images else None,
        "max_new_tokens": args.max_new_tokens,
    }
    print(format_scores(scores))
    if args.output:
        preds, score_file = write_results(args.output, prediction_records(items, predictions), scores)
        log.info("wrote %s and %s", preds, score_file)
    return 0
