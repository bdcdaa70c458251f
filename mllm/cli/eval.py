"""`mllm eval CKPT --data FILE_OR_RECIPE`: batched generation over QA or caption data, scores and predictions;
`--task retrieval`: a stage-0 Q-Former's image-text retrieval, zero-shot classification and ITM accuracy."""

from __future__ import annotations

# Heavy modules (torch, transformers, the model) are imported inside the functions that need them, when the
# command runs: parsing arguments and `--help` stay instant.
import argparse
import logging
from pathlib import Path

from mllm.cli import UserError
from mllm.cli.options import add_image_root, add_model_arguments, load_model

log = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument(
        "--data",
        required=True,
        nargs="+",
        metavar="FILE_OR_RECIPE",
        help="a data file (LLaVA JSON/JSONL, webdataset shards …) or a data recipe YAML; several are scored "
        "one after another with one model load, each into --output/<its file name without suffix>/",
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
    p.add_argument(
        "--output",
        nargs="+",
        metavar="DIR",
        help="directory for predictions.jsonl and scores.json; with several --data files, one directory each "
        "(in their order) or one parent holding a sub-directory per file, named by the file without its suffix",
    )
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
    p.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    from mllm.eval.data import load_eval_items, swap_images

    if args.batch_size < 1:
        raise UserError("--batch-size must be >= 1")
    if args.swap_images and args.task != "generate":
        raise UserError("--swap-images is a control of --task generate")
    outputs = output_dirs(args.output, args.data)
    # every file is read (and checked) before the model loads: a bad one fails in seconds, not after the others
    sets = [load_eval_items(data, limit=args.limit, image_root=args.image_root) for data in args.data]
    if args.swap_images:
        sets = [swap_images(items, seed=args.seed) for items in sets]
    if args.task == "retrieval":
        return run_retrieval(args, sets, outputs)
    model, processor = load_model(args)
    score_one = run_alignment if args.task == "alignment" else run_generate
    for data, items, out in zip(args.data, sets, outputs, strict=True):
        if len(sets) > 1:
            print(f"== {data}")
        score_one(args, model, processor, data, items, out)
    return 0


def output_dirs(output: list[str] | None, data: list[str]) -> list[str | None]:
    """Where each --data file's results go: nowhere, the --output directories paired with the files in order, or
    for a single --output and several files, <output>/<file stem>/."""
    if output is None:
        return [None] * len(data)
    if len(output) == len(data):
        return list(output)
    if len(output) > 1:
        raise UserError(
            f"--output: {len(output)} directories for {len(data)} --data files; give one each, or one"
        )
    stems = [Path(d.rstrip("/")).name.split(".")[0] for d in data]
    clash = sorted({s for s in stems if stems.count(s) > 1})
    if clash:
        raise UserError(
            f"--data files {clash} would write to the same --output sub-directory; evaluate them in separate runs"
        )
    return [str(Path(output[0]) / stem) for stem in stems]


def run_generate(args: argparse.Namespace, model, processor, data: str, items, out: str | None) -> None:
    from mllm.eval.runner import (
        detect_metric,
        format_scores,
        predict,
        prediction_records,
        score,
        write_results,
    )
    from mllm.inference import SamplingConfig

    metric = detect_metric(items) if args.metric == "auto" else args.metric
    sampling = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=0.0)
    predictions = predict(model, processor, items, sampling, args.batch_size, progress=not args.no_progress)
    scores = score(items, predictions, metric)
    scores["run"] = {
        "checkpoint": processor.config.get("_path", args.checkpoint),
        "data": data,
        "metric": metric,
        "swap_images": args.swap_images,
        "seed": args.seed if args.swap_images else None,
        "max_new_tokens": args.max_new_tokens,
    }
    print(format_scores(scores))
    if out:
        preds, score_file = write_results(out, prediction_records(items, predictions), scores)
        log.info("wrote %s and %s", preds, score_file)


def run_retrieval(args: argparse.Namespace, sets: list, outputs: list[str | None]) -> int:
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
    for data, items, out in zip(args.data, sets, outputs, strict=True):
        scores = retrieval_scores(
            model, items, args.batch_size, seed=args.seed, progress=not args.no_progress
        )
        scores["run"] = {"checkpoint": config["_path"], "data": data, "task": "retrieval", "seed": args.seed}
        print(format_retrieval(scores))
        if out:
            _, score_file = write_results(out, [], scores)
            log.info("wrote %s", score_file)
    return 0


def run_alignment(args: argparse.Namespace, model, processor, data: str, items, out: str | None) -> None:
    from mllm.eval.alignment import alignment_scores, format_alignment
    from mllm.eval.runner import write_results

    if not all(it.images for it in items):
        raise UserError(f"{data}: --task alignment needs an image in every sample")
    scores = alignment_scores(model, processor, items, args.batch_size, progress=not args.no_progress)
    scores["run"] = {
        "checkpoint": processor.config.get("_path", args.checkpoint),
        "data": data,
        "task": "alignment",
    }
    print(format_alignment(scores))
    if out:
        _, score_file = write_results(out, [], scores)
        log.info("wrote %s", score_file)
