"""The mllm side: `MultimodalLM` (`build_model`) fed by `mllm.data`, trained by an in-process loop with its levers.

The loop is the plain optimizer step the trainer runs on one device (forward →
loss summed over supervised tokens / their count → backward → clip 1.0 → fused
AdamW), without DeepSpeed, whose single-process engine adds nothing to measure
here. Every optimisation is a `Levers` flag so the bench can switch each off.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import torch
from torch import nn

from mllm.bench.meter import StepMeter, peak_rss_mb
from mllm.bench.work import Work, stage_dataset
from mllm.data.encode import IGNORE_INDEX


def _lever(help: str):
    return dataclasses.field(default=True, metadata={"help": help})


@dataclass
class Levers:
    """mllm's optimisations, each on by default; `--levers` measures the bench with each one off."""

    supervised_head: bool = _lever(
        "logits and loss only at supervised positions (image and prompt tokens never "
        "reach the vocabulary head), in chunks of LOSS_CHUNK positions recomputed in backward"
    )
    packing: bool = _lever(
        "several samples per row (first-fit-decreasing), per-sample position ids, no attention across samples"
    )
    causal_kernel: bool = _lever(
        "a micro-batch whose rows each hold one sample carries no attention mask (its right padding is never "
        "attended by a real token), so SDPA runs its causal kernel, skipping the score blocks above the diagonal"
    )
    length_grouping: bool = _lever(
        "micro-batches of samples of similar exact length (images included), from the data layer's sampler"
    )
    few_shapes: bool = _lever(
        "rows padded to a multiple of PAD_MULTIPLE tokens: oneDNN builds and keeps a matmul kernel per shape, "
        "so one shape per length grew peak RSS with every new length"
    )
    feature_cache: bool = _lever(
        "frozen vision tower: its features read from the on-disk cache instead of decoding "
        "and encoding images"
    )
    workers: bool = _lever(
        "a persistent dataloader worker with deep prefetch, so the step never waits for data"
    )
    compile: bool = _lever(
        "torch.compile of each LLM decoder layer (dynamic shapes) with eager attention inside: fuses the norm, "
        "rotary, MLP and softmax work; an explicit 4D mask on every batch, so no recompiles"
    )

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def describe(cls, name: str) -> str:
        return {f.name: f.metadata["help"] for f in dataclasses.fields(cls)}[name]


def model_config(work: Work, stage: int, dtype: str, attn_implementation: str = "sdpa"):
    from mllm.config import ConnectorConfig, LLMConfig, ModelConfig, VisionConfig

    return ModelConfig(
        vision=VisionConfig(path=work.vision, feature_layer=-2),
        connector=ConnectorConfig(kind="mlp", projector="mlp2x_gelu"),
        llm=LLMConfig(path=work.llm, mode="frozen" if stage == 1 else "full"),
        dtype=dtype,
        attn_implementation=attn_implementation,
    )


def full_vocabulary_loss(model, batch: dict) -> torch.Tensor:
    """The standard computation (what the `supervised_head` lever replaces): logits at every position, then CE."""
    out = model(**_model_inputs(batch), return_logits=True)
    logits = out.logits[:, :-1].float()
    targets = batch["labels"][:, 1:]
    return nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX
    )


def _model_inputs(batch: dict) -> dict:
    keys = ("input_ids", "attention_mask", "pixel_values", "features", "image_counts", "position_ids")
    return {k: batch[k] for k in keys if batch.get(k) is not None}


PAD_MULTIPLE = 16
"""Row widths are rounded up to a multiple of this (the `few_shapes` lever). Measured on the default work,
stage 1 (captions of 229–265 tokens): peak RSS after 100 steps 1,706 → 1,293 MiB (8: 1,347); oneDNN's
primitive cache was what grew (with ONEDNN_PRIMITIVE_CACHE_CAPACITY=0 it stays flat, at 3× the step time)."""

LOSS_CHUNK = 2048
"""Supervised positions per head+loss chunk: bounds the logits kept for backward to LOSS_CHUNK × vocabulary."""


def supervised_loss(model, batch: dict, chunk_size: int | None = LOSS_CHUNK) -> torch.Tensor:
    return model(**_model_inputs(batch), labels=batch["labels"], loss_chunk_size=chunk_size).loss


def compile_decoder_layers(model) -> int:
    """Compile every decoder layer of the LLM in place (dynamic shapes, one compile for all lengths); returns how many."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in model.llm.modules() if isinstance(m, GradientCheckpointingLayer)]
    for layer in layers:
        layer.compile(dynamic=True)
    return len(layers)


def with_explicit_mask(batch: dict, additive_dtype: torch.dtype | None = None) -> dict:
    """The batch with its exact 4D attention mask spelled out (see `causal_block_mask`), for compiled layers.

    Boolean for SDPA; with `additive_dtype`, the additive form eager attention adds to its scores (0 or the
    dtype's minimum). A mask-free batch (`PackingCollator.mask_free`) stays as it is: plain causal attention,
    which transformers gives SDPA as its causal flag (and eager attention as a causal mask of its own).
    """
    from mllm.data.packing import causal_block_mask

    if batch.get("attention_mask") is None and batch.get("position_ids") is None:
        return batch

    mask = causal_block_mask(batch.get("position_ids"), batch.get("attention_mask"))
    if additive_dtype is not None:
        mask = torch.zeros(mask.shape, dtype=additive_dtype).masked_fill(
            ~mask, torch.finfo(additive_dtype).min
        )
    return {**batch, "attention_mask": mask}


EAGER_ATTENTION_MAX_LENGTH = 512
"""Compiled layers use eager attention when no sample is longer than this: inductor fuses its matmul-softmax-
matmul, forward and backward, ~1.8x faster than the CPU flash-attention kernel (whose backward costs ~6x its
forward), but it keeps the [rows, heads, T, T] probabilities for backward, which only stays small for short rows."""


def attention_for(lengths: list[int], levers: Levers) -> str:
    """`eager` for compiled layers on short data (stage 1 captions), else `sdpa` (memory-efficient on long rows)."""
    return "eager" if levers.compile and max(lengths) <= EAGER_ATTENTION_MAX_LENGTH else "sdpa"


def precompile(model, loader, sampler, loss_of) -> None:
    """Compile for the epoch's longest and shortest micro-batches before the clock starts; gradients discarded.

    Inductor specialises its kernels on size thresholds (one seen here: rows × length > 4096), so a batch on the
    other side of one would recompile inside the timed window; both extremes are compiled up front instead, for
    each attention layout the epoch holds (mask-free and masked batches are different graphs).
    """
    batches = sampler.batches()
    chosen = []
    for kind in (True, False):
        of_kind = [
            i
            for i, b in enumerate(batches)
            if loader.collate_fn.is_mask_free(sampler.lengths[b].tolist()) == kind
        ]
        if of_kind:
            chosen.append(max(of_kind, key=lambda i: max(sampler.lengths[batches[i]])))
            chosen.append(min(of_kind, key=lambda i: max(sampler.lengths[batches[i]])))
    for i in dict.fromkeys(chosen):
        batch = loader.collate_fn([loader.dataset[j] for j in batches[i]])
        loss_of(batch).backward()
    model.zero_grad(set_to_none=True)


def _compiled_graphs() -> int:
    """Graphs dynamo compiled in this process so far (recompiles for new shapes show up here)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def build_loader(
    work: Work,
    stage: int,
    model,
    tokenizer,
    levers: Levers,
    batch_size: int,
    samples: int | None,
    cache_dir: str,
    seed: int,
):
    """(dataset, sampler, loader, cache info) for this stage, as the levers say."""
    from torch.utils.data import DataLoader

    from mllm.data import MixtureBatchSampler
    from mllm.data.packing import PackingCollator
    from mllm.vision.cache import CachedFeatureDataset, FeatureCache, fill_in_subprocess

    frozen_tower = model.config.vision.trainable == "frozen"
    use_cache = levers.feature_cache and frozen_tower
    ds = stage_dataset(
        work,
        stage,
        tokenizer,
        model.num_image_tokens,
        None if use_cache else model.vision.preprocess,
        samples=samples,
    )
    info = {"feature_cache": use_cache}
    data = ds
    if use_cache:
        data = CachedFeatureDataset(ds, FeatureCache(cache_dir, model.vision))
        t = time.perf_counter()
        images = [src for i in range(len(data)) for src in data.image_sources(i)[2]]
        tower_dtype = next(model.vision.parameters()).dtype
        info["cache_filled_images"] = fill_in_subprocess(model.config.vision, tower_dtype, cache_dir, images)
        info["cache_fill_s"] = time.perf_counter() - t
        info["cache_dir"] = data.cache.dir
    sampler = MixtureBatchSampler(
        ds, micro_batch_size=batch_size, seed=seed, group_by_length=levers.length_grouping
    )
    workers = 1 if levers.workers else 0
    loader = DataLoader(
        data,
        batch_sampler=sampler,
        collate_fn=PackingCollator(
            tokenizer.pad_token_id,
            pack=levers.packing,
            mask_free=levers.causal_kernel,
            pad_to_multiple_of=PAD_MULTIPLE if levers.few_shapes else 1,
        ),
        num_workers=workers,
        prefetch_factor=8 if workers else None,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=workers > 0,
    )
    return ds, sampler, loader, info


def run_mllm(
    work: Work,
    stage: int,
    steps: int,
    warmup: int,
    batch_size: int,
    lr: float,
    dtype: torch.dtype,
    samples: int | None,
    levers: Levers,
    cache_dir: str,
    seed: int = 0,
) -> dict:
    from mllm.model import build_model
    from mllm.model.build import load_tokenizer

    torch.manual_seed(seed)
    cfg = model_config(work, stage, {torch.bfloat16: "bf16", torch.float32: "fp32"}[dtype])
    model = build_model(cfg)
    model.train()
    tokenizer = load_tokenizer(cfg)
    rss = {"model": peak_rss_mb()}
    ds, sampler, loader, info = build_loader(
        work, stage, model, tokenizer, levers, batch_size, samples, cache_dir, seed
    )
    rss["data"] = peak_rss_mb()
    attn = attention_for(ds.lengths, levers)
    if attn != cfg.attn_implementation:
        model.llm.set_attn_implementation(attn)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, fused=True)
    loss_fn = supervised_loss if levers.supervised_head else full_vocabulary_loss
    mask_dtype = dtype if attn == "eager" else None
    if levers.compile:
        info["compiled_layers"] = compile_decoder_layers(model)
        t = time.perf_counter()
        precompile(model, loader, sampler, lambda b: loss_fn(model, with_explicit_mask(b, mask_dtype)))
        info["precompile_s"] = time.perf_counter() - t
        rss["precompile"] = peak_rss_mb()
    meter = StepMeter(warmup=warmup)
    rss_trace: list[int] = []
    batches = iter(loader)
    t_start = time.perf_counter()
    total = warmup + steps if steps > 0 else len(sampler)  # 0 timed steps asked = one full epoch
    for _ in range(total):
        t = time.perf_counter()
        try:
            batch = next(batches)
        except StopIteration:  # next epoch
            sampler.set_epoch(sampler.epoch + 1)
            batches = iter(loader)
            batch = next(batches)
        wait = time.perf_counter() - t
        loss = loss_fn(model, with_explicit_mask(batch, mask_dtype) if levers.compile else batch)
        loss.backward()
        nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)
        supervised = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
        meter.batch(
            batch["sample_lengths"], batch["sample_images"], batch["input_ids"].numel(), supervised, wait
        )
        meter.step_end(loss.item())
        if meter.steps % 25 == 0:
            rss_trace.append(round(peak_rss_mb()))
    wall = time.perf_counter() - t_start
    rss["train"] = peak_rss_mb()
    rss["every_25_steps"] = rss_trace
    info["compiled_graphs"] = _compiled_graphs()
    info["peak_rss_mb_after"] = rss
    result = meter.result()
    result.update(
        side="mllm",
        settings={
            "loop": "in-process optimizer step (mllm.bench.ours)",
            "model": "mllm MultimodalLM",
            "attn": attn,
            "sampling": "mllm.data.MixtureBatchSampler",
            "dataloader_workers": 1 if levers.workers else 0,
            "optim": "torch AdamW fused",
            "dtype": str(dtype).removeprefix("torch."),
            "levers": dataclasses.asdict(levers),
            **info,
        },
        train_wall_s=wall,
        peak_rss_mb=peak_rss_mb(),
        dataset_samples=len(ds),
    )
    del loader, batches
    return result
