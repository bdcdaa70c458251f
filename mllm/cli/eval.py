"""`mllm eval CKPT --data FILE_OR_RECIPE`: batched generation over QA or caption data, scores and predictions;
`--task retrieval`: a stage-0 Q-Former's image-text retrieval, zero-shot classification and ITM accuracy."""

from __future__ import annotations

# Heavy modules (torch, transformers, the model) are imported inside the functions that need them, when the
# command runs: parsing arguments and `--help` stay instant.
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
    p.add_argument(
        "--task",
        choices=["generate", "retrieval", "alignment"],
        default="generate",
        help="generate: answer and score (QA / captions); retrieval: a Q-Former pretraining (stage 0) checkpoint "
        "over caption data: image-text recall@1/5, zero-shot classification among the distinct captions, ITM accuracy; "
        "alignment: the Modality Integration Rate (MIR) of any checkpoint's visual tokens inside its LLM",
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
        help="run LoRA adapters unmerged (default: folded into the bf16/fp32 base in memory, which runs faster)",
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
    if args.task == "retrieval":
        return run_retrieval(args, items)
    if args.swap_images:
        items = swap_images(items, seed=args.seed)
    if args.swap_images and args.task != "generate":
        raise UserError("--swap-images is a control of --task generate")
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
    if args.task == "alignment":
        return run_alignment(args, model, processor, items)
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


def run_retrieval(args: argparse.Namespace, items) -> int:
    from mllm.checkpoint import CheckpointError
    from mllm.eval.retrieval import format_retrieval, retrieval_scores
    from mllm.eval.runner import write_results
    from mllm.model.qformer_pretrain import load_qformer_pretrainer

    try:
        model, config = load_qformer_pretrainer(
            args.checkpoint, device=args.device, verify_hashes=not args.no_verify
        )
    except CheckpointError as e:
        raise UserError(str(e)) from None
    scores = retrieval_scores(model, items, args.batch_size, seed=args.seed, progress=not args.no_progress)
    scores["run"] = {"checkpoint": config["_path"], "data": args.data, "task": "retrieval", "seed": args.seed}
    print(format_retrieval(scores))
    if args.output:
        _, score_file = write_results(args.output, [], scores)
        log.info("wrote %s", score_file)
    return 0


def run_alignment(args: argparse.Namespace, model, processor, items) -> int:
    from mllm.eval.alignment import alignment_scores, format_alignment
    from mllm.eval.runner import write_results

    if not all(it.images for it in items):
        raise UserError(f"{args.data}: --task alignment needs an image in every sample")
    scores = alignment_scores(model, processor, items, args.batch_size, progress=not args.no_progress)
    scores["run"] = {
        "checkpoint": processor.config.get("_path", args.checkpoint),
        "data": args.data,
        "task": "alignment",
    }
    print(format_alignment(scores))
    if args.output:
        _, score_file = write_results(args.output, [], scores)
        log.info("wrote %s", score_file)
    return 0
