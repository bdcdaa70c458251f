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


@dataclass
class Levers:
    """mllm's optimisations, each on by default; `--levers` measures the bench with each one off."""

    supervised_head: bool = True
    """Logits and loss only at supervised positions (image and prompt tokens never reach the vocabulary head)."""
    packing: bool = True
    """Several samples per row (first-fit-decreasing), per-sample position ids, no attention across samples."""
    length_grouping: bool = True
    """Micro-batches of samples of similar exact length (images included), from the data layer's sampler."""
    feature_cache: bool = True
    """Frozen vision tower: read its features from the on-disk cache instead of decoding and encoding images."""
    workers: bool = True
    """A persistent dataloader worker with deep prefetch, so the step never waits for data."""

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def describe(cls, name: str) -> str:
        import ast
        import inspect

        # the attribute docstrings above are the documentation: read them rather than repeat them
        tree = ast.parse(inspect.getsource(cls))
        body = tree.body[0].body
        for node, nxt in zip(body, body[1:]):
            if isinstance(node, ast.AnnAssign) and node.target.id == name and isinstance(nxt, ast.Expr):
                return nxt.value.value
        return name


def model_config(work: Work, stage: int, dtype: str):
    from mllm.config import ConnectorConfig, LLMConfig, ModelConfig, VisionConfig

    return ModelConfig(
        vision=VisionConfig(path=work.vision, feature_layer=-2),
        connector=ConnectorConfig(kind="mlp", projector="mlp2x_gelu"),
        llm=LLMConfig(path=work.llm, mode="frozen" if stage == 1 else "full"),
        dtype=dtype,
        attn_implementation="sdpa",
    )


def full_vocabulary_loss(model, batch: dict) -> torch.Tensor:
    """The standard computation (what the `supervised_head` lever replaces): logits at every position, then CE."""
    out = model(**_model_inputs(batch), return_logits=True)
    logits = out.logits[:, :-1].float()
    targets = batch["labels"][:, 1:]
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX)


def _model_inputs(batch: dict) -> dict:
    keys = ("input_ids", "attention_mask", "pixel_values", "features", "image_counts", "position_ids")
    return {k: batch[k] for k in keys if batch.get(k) is not None}


def supervised_loss(model, batch: dict) -> torch.Tensor:
    return model(**_model_inputs(batch), labels=batch["labels"]).loss


def build_loader(work: Work, stage: int, model, tokenizer, levers: Levers, batch_size: int, samples: int | None,
                 cache_dir: str, seed: int):
    """(dataset, sampler, loader, cache info) for this stage, as the levers say."""
    from torch.utils.data import DataLoader

    from mllm.data import MixtureBatchSampler
    from mllm.data.packing import PackingCollator
    from mllm.vision.cache import CachedFeatureDataset, FeatureCache

    frozen_tower = model.config.vision.trainable == "frozen"
    use_cache = levers.feature_cache and frozen_tower
    ds = stage_dataset(work, stage, tokenizer, model.num_image_tokens, None if use_cache else model.vision.preprocess,
                       samples=samples)
    info = {"feature_cache": use_cache}
    data = ds
    if use_cache:
        data = CachedFeatureDataset(ds, FeatureCache(cache_dir, model.vision))
        t = time.perf_counter()
        info["cache_filled_images"] = data.fill(progress=False)
        info["cache_fill_s"] = time.perf_counter() - t
        info["cache_dir"] = data.cache.dir
    sampler = MixtureBatchSampler(ds, micro_batch_size=batch_size, seed=seed, group_by_length=levers.length_grouping)
    workers = 1 if levers.workers else 0
    loader = DataLoader(
        data,
        batch_sampler=sampler,
        collate_fn=PackingCollator(tokenizer.pad_token_id, pack=levers.packing),
        num_workers=workers,
        prefetch_factor=8 if workers else None,
        persistent_workers=workers > 0,
    )
    return ds, sampler, loader, info


def run_mllm(work: Work, stage: int, steps: int, warmup: int, batch_size: int, lr: float, dtype: torch.dtype,
             samples: int | None, levers: Levers, cache_dir: str, seed: int = 0) -> dict:
    from mllm.model import build_model
    from mllm.model.build import load_tokenizer

    torch.manual_seed(seed)
    cfg = model_config(work, stage, {torch.bfloat16: "bf16", torch.float32: "fp32"}[dtype])
    model = build_model(cfg)
    model.train()
    tokenizer = load_tokenizer(cfg)
    ds, sampler, loader, info = build_loader(work, stage, model, tokenizer, levers, batch_size, samples, cache_dir, seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, fused=True)
    loss_fn = supervised_loss if levers.supervised_head else full_vocabulary_loss
    meter = StepMeter(warmup=warmup)
    batches = iter(loader)
    t_start = time.perf_counter()
    for _ in range(warmup + steps):
        t = time.perf_counter()
        try:
            batch = next(batches)
        except StopIteration:  # next epoch
            sampler.set_epoch(sampler.epoch + 1)
            batches = iter(loader)
            batch = next(batches)
        wait = time.perf_counter() - t
        loss = loss_fn(model, batch)
        loss.backward()
        nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)
        supervised = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
        meter.batch(batch["sample_lengths"], batch["sample_images"], batch["input_ids"].numel(), supervised, wait)
        meter.step_end(loss.item())
    wall = time.perf_counter() - t_start
    result = meter.result()
    result.update(
        side="mllm",
        settings={"loop": "in-process optimizer step (mllm.bench.ours)", "model": "mllm MultimodalLM",
                  "attn": cfg.attn_implementation, "sampling": "mllm.data.MixtureBatchSampler",
                  "dataloader_workers": 1 if levers.workers else 0, "optim": "torch AdamW fused",
                  "dtype": str(dtype).removeprefix("torch."), "levers": dataclasses.asdict(levers), **info},
        train_wall_s=wall,
        peak_rss_mb=peak_rss_mb(),
        dataset_samples=len(ds),
    )
    del loader, batches
    return result
