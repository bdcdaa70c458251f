"""The mllm side: `mllm train` itself — its `setup` (model, data, sampler, collator, DeepSpeed engine, optimizer) and
its `train_step`, timed step by step, without checkpoints.

Nothing here trains: the run config is the product's `TrainConfig` (stage preset, then the bench's few settings,
then any `--mllm-set KEY=VALUE`), so every default and lever of `mllm train` applies as it would for a user, and a
regression in the product shows in the bench. The only difference from `fit` is that no checkpoint is written.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import torch

from mllm.bench.meter import StepMeter, peak_rss_mb
from mllm.bench.rows import Row
from mllm.train.batches import supervised_tokens


def train_config(
    work,
    row: Row,
    recipe: str,
    output: str,
    steps: int,
    batch_size: int,
    dtype: str,
    seed: int = 0,
    zero: str = "",
    overrides: dict[str, Any] | None = None,
):
    """The `TrainConfig` of this row, as `mllm train --stage S` would resolve it with these options.

    `steps`: optimizer steps of one micro-batch each (grad_accum 1, as the reference steps); 0 = one epoch. Constant lr, no
    warm-up: the schedule costs nothing, and the same lr on every step keeps the rounds alike."""
    from mllm.train.config import resolve_config

    settings = dict(
        vision=work.vision,
        llm=work.llm,
        data=recipe,
        output=output,
        llm_mode=row.llm_mode,
        micro_batch_size=batch_size,
        grad_accum=1,
        max_steps=steps,
        lr=row.lr,
        schedule="constant",
        warmup_ratio=0.0,
        dtype=dtype,
        seed=seed,
        resume="no",
        zero=zero,
    )
    settings.update(overrides or {})
    return resolve_config(stage=row.stage, **settings)


def parse_settings(pairs: list[str]) -> dict[str, Any]:
    """`KEY=VALUE` strings (`--mllm-set`) → TrainConfig overrides, each VALUE parsed as the field's command-line
    option parses it (a bad key or value fails here, naming it)."""
    import argparse

    from mllm.train.config import add_config_arguments

    parser = argparse.ArgumentParser(prog="--mllm-set", add_help=False)
    add_config_arguments(parser)
    argv = []
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--mllm-set {pair!r}: expected KEY=VALUE, e.g. num_workers=1")
        argv += ["--" + key.strip().replace("_", "-"), value]
    try:
        values = vars(parser.parse_args(argv))
    except SystemExit:
        raise ValueError(
            f"--mllm-set {' '.join(pairs)}: not a valid `mllm train` option (see --help)"
        ) from None
    values.pop("config", None)
    return values


class MeteredStream:
    """The run's `BatchStream`, handing `train_step` exactly the same micro-batches while the meter records what
    each holds and how long the step waited for it."""

    def __init__(self, stream, meter: StepMeter, pad_token_id: int):
        self.stream, self.meter, self.pad_token_id = stream, meter, pad_token_id

    def next(self) -> dict[str, Any]:
        t = time.perf_counter()
        batch = self.stream.next()
        wait = time.perf_counter() - t
        lengths, images = batch_samples(batch, self.pad_token_id)
        self.meter.batch(lengths, images, batch["input_ids"].numel(), supervised_tokens(batch), wait)
        return batch

    @property
    def epoch_progress(self) -> float:
        return self.stream.epoch_progress


def batch_samples(batch: dict[str, Any], pad_token_id: int) -> tuple[list[int], list[int]]:
    """(tokens, images) of every real sample of a micro-batch (not of the blank row `BlankImageRow` may add).

    A collator that packs rows says it (`sample_lengths`, `sample_images`); otherwise one sample per row, its
    length from the attention mask or, on mask-free batches, up to the row's right padding."""
    if "sample_lengths" in batch:
        return list(batch["sample_lengths"]), list(batch["sample_images"])
    rows = len(batch["sample_ids"])
    ids = batch["input_ids"][:rows]
    if batch.get("attention_mask") is not None:
        lengths = batch["attention_mask"][:rows].sum(1)
    else:
        real = ids != pad_token_id
        trailing_pad = real.flip(1).int().argmax(1)  # pad positions after the last real token
        lengths = torch.where(real.any(1), ids.shape[1] - trailing_pad, 0)
    return [int(n) for n in lengths], [int(n) for n in batch["image_counts"][:rows]]


def run_mllm(cfg, warmup: int) -> dict:
    """Set the run up as `mllm train` does, run `cfg.max_steps` optimizer steps, time those after `warmup`.

    Returns this process's measurements (each rank of a multi-process run reports its own)."""
    from mllm.train import loop

    t0 = time.perf_counter()
    s = loop.setup(cfg)
    setup_s = time.perf_counter() - t0
    rss_setup = peak_rss_mb()
    meter = StepMeter(warmup=warmup)
    stream = MeteredStream(s.stream, meter, s.data.loader.collate_fn.pad_token_id)
    losses = []
    try:
        for step in range(1, s.total_steps + 1):
            record = loop.train_step(s.engine, stream, s.world, s.grad_accum, step)
            meter.step_end(record["loss"])
            losses.append(record["loss"])
    finally:
        s.stream.close()
    result = meter.result()
    result.update(
        side="mllm",
        rank=s.world.rank,
        world_size=s.world.size,
        setup_s=setup_s,
        settings=_settings(s),
        peak_rss_mb=peak_rss_mb(),
        peak_rss_mb_after_setup=rss_setup,
        dataset_samples=len(s.data.dataset),
        first_loss=losses[0],
    )
    return result


def _settings(s) -> dict[str, Any]:
    """What the run actually used, read back from the live session (not from what was asked)."""
    llm = s.model.llm
    attn = getattr(llm.config, "_attn_implementation", None)
    return {
        "trainer": "mllm.train.loop (setup + train_step, as `mllm train`)",
        "run_config": dataclasses.asdict(s.cfg),
        "attn": attn,
        "zero_stage": s.engine.zero_optimization_stage(),
        "optimizer": type(s.engine.optimizer).__name__,
        "dataloader_workers": s.data.loader.num_workers,
        "collator": type(s.data.loader.collate_fn).__name__,
        "sampler": type(s.data.sampler).__name__,
        # ZeRO-3 leaves each rank a placeholder of the parameter; ds_numel is its full size
        "trainable_params": sum(
            getattr(p, "ds_numel", p.numel()) for p in s.model.parameters() if p.requires_grad
        ),
    }
