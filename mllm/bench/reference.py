"""The reference side: `transformers.LlavaForConditionalGeneration` trained by `transformers.Trainer`.

Assembled from the same backbone directories (the run config's vision feature
layer, CLS dropped by the `default` strategy, `image_token_id` = the
tokenizer's `<image>`), trained with what a competent transformers user turns
on: `group_by_length` with precomputed lengths, bf16, fused AdamW, and the
`ReferenceSettings` (attention kernel, dataloader workers, `torch_compile`)
that scripts/bench.py measures and keeps the fastest of. Labels only on
assistant tokens (the same ids and labels as the mllm side, `<image>` expanded
to the patch count as the LLaVA processor does). Trains what the row trains:
the projector (LLM frozen), projector + full LLM, or projector + LoRA adapters
made by PEFT with the mllm run's own r, alpha, dropout and target modules.
Under `torchrun` each process is one DDP rank (gloo on a CPU).
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
from PIL import Image

from mllm.bench.meter import StepMeter, peak_rss_mb
from mllm.bench.work import Work, encoded_item, recipe_dataset
from mllm.config import IMAGE_PLACEHOLDER, IMAGE_TOKEN_ID, LLMConfig
from mllm.data import IGNORE_INDEX


@dataclass(frozen=True)
class ReferenceSettings:
    """The reference's settings that scripts/bench.py tries (each measured, the fastest kept)."""

    attention: str = "sdpa"
    """The LLM's and tower's attn_implementation: sdpa or eager."""
    workers: int = 1
    """DataLoader workers (persistent, opening and preprocessing images): 0, 1 or 2."""
    compile: bool = False
    """TrainingArguments(torch_compile=True): the whole model compiled by torch.compile."""

    def __post_init__(self):
        if self.attention not in ("sdpa", "eager") or self.workers < 0:
            raise ValueError(f"reference settings: attention sdpa|eager and workers >= 0, got {self}")

    def to_dict(self) -> dict:
        return asdict(self)

    def text(self) -> str:
        """The `--reference` form, which `parse` reads back."""
        return f"attention={self.attention},workers={self.workers},compile={'on' if self.compile else 'off'}"

    @classmethod
    def parse(cls, text: str) -> ReferenceSettings:
        """`attention=sdpa,workers=1,compile=off` (any subset) → settings."""
        values: dict[str, Any] = {}
        for pair in filter(None, (p.strip() for p in text.split(","))):
            key, _, value = pair.partition("=")
            if key == "workers":
                values[key] = int(value)
            elif key == "compile":
                values[key] = value.lower() in ("1", "true", "on", "yes")
            elif key == "attention":
                values[key] = value
            else:
                raise ValueError(
                    f"reference settings {text!r}: unknown key {key!r} (attention, workers, compile)"
                )
        return cls(**values)


def fastest_settings(measure: Callable[[ReferenceSettings], float]) -> tuple[ReferenceSettings, list[dict]]:
    """Coordinate search over the reference's uncertain settings, keeping the faster at each stage: dataloader
    workers 0, 1, 2 (sdpa, no compile), then eager attention, then torch_compile. `measure` returns samples/s.
    Returns the fastest settings and every try."""
    tried: list[dict] = []

    def speed(settings: ReferenceSettings) -> float:
        tried.append({"settings": settings.to_dict(), "samples_per_s": measure(settings)})
        return tried[-1]["samples_per_s"]

    best = max((ReferenceSettings(workers=w) for w in (0, 1, 2)), key=speed)
    best_speed = max(t["samples_per_s"] for t in tried)
    for change in ({"attention": "eager"}, {"compile": True}):  # each on top of the best so far
        candidate = replace(best, **change)
        if (candidate_speed := speed(candidate)) > best_speed:
            best, best_speed = candidate, candidate_speed
    return best, tried


def build_llava(
    work: Work, dtype: torch.dtype, llm_cfg: LLMConfig, attention: str = "sdpa", feature_layer: int = -2
):
    """A LlavaForConditionalGeneration whose tower, LLM and head are the loaded backbones (with LoRA adapters when
    `llm_cfg.mode` is lora); the projector is new."""
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        CLIPVisionModel,
        LlavaConfig,
        LlavaForConditionalGeneration,
    )
    from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

    tokenizer = AutoTokenizer.from_pretrained(work.llm)
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER)
    if image_token_id is None or image_token_id == tokenizer.unk_token_id:
        raise ValueError(f"{work.llm}: the tokenizer has no {IMAGE_PLACEHOLDER} token")
    vision = CLIPVisionModel.from_pretrained(work.vision, dtype=dtype, attn_implementation=attention)
    llm = AutoModelForCausalLM.from_pretrained(work.llm, dtype=dtype, attn_implementation=attention)
    if llm_cfg.mode == "lora":
        add_lora(llm, llm_cfg)
    patches = (vision.config.image_size // vision.config.patch_size) ** 2
    config = LlavaConfig(
        vision_config=vision.config,
        text_config=llm.config,
        image_token_id=image_token_id,
        image_seq_length=patches,
        vision_feature_layer=feature_layer,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )
    config._attn_implementation = attention
    with torch.device("meta"):  # the shell only: every module is replaced by a loaded or freshly built one
        model = LlavaForConditionalGeneration(config)
    model.model.vision_tower = vision
    model.model.language_model = llm.model
    model.lm_head = llm.lm_head
    model.model.multi_modal_projector = LlavaMultiModalProjector(config).to(dtype)
    model.config.use_cache = False
    return model, tokenizer, image_token_id, patches


def set_trainability(model, llm_mode: str) -> None:
    """Tower frozen, projector trained, the LLM as `llm_mode` says (lora: PEFT already froze the base and made the
    adapters `build_llava` added trainable)."""
    model.model.vision_tower.requires_grad_(False)
    model.model.multi_modal_projector.requires_grad_(True)
    if llm_mode in ("frozen", "full"):
        model.model.language_model.requires_grad_(llm_mode == "full")
        model.lm_head.requires_grad_(llm_mode == "full")
    elif llm_mode != "lora":
        raise ValueError(f"the reference side trains the LLM frozen, full or lora, not {llm_mode!r}")


def add_lora(llm, settings: LLMConfig) -> None:
    """LoRA adapters on the causal LM, in place, with the mllm run's r, alpha, dropout and targets (PEFT's
    `all-linear` skips the head, as in mllm)."""
    from peft import LoraConfig, get_peft_model

    lora = settings.lora
    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        task_type="CAUSAL_LM",
    )
    get_peft_model(llm, config)  # wraps the target linear layers of `llm` itself


def hf_dataset(recipe: str, tokenizer, image_token_id: int, patches: int):
    """A `datasets.Dataset` of ids, labels, image path and precomputed `length` (what group_by_length reads)."""
    import datasets

    ds = recipe_dataset(recipe, tokenizer, patches, preprocess=None)
    rows: dict[str, list] = {"input_ids": [], "labels": [], "image": [], "length": []}
    for i in range(len(ds)):
        _, enc, paths = encoded_item(ds, i)
        rows["input_ids"].append([image_token_id if t == IMAGE_TOKEN_ID else t for t in enc.input_ids])
        rows["labels"].append(enc.labels)
        if len(paths) > 1:
            raise ValueError("the reference side supports one image per sample")
        rows["image"].append(paths[0] if paths else "")
        rows["length"].append(len(enc.input_ids))
    return datasets.Dataset.from_dict(rows)


class ReferenceCollator:
    """Opens and preprocesses each sample's image (in the dataloader worker, like TRL's vision collators), right-pads
    ids (pad token) and labels (IGNORE_INDEX), and stacks the pixel values of the samples that have an image."""

    def __init__(self, pad_token_id: int, processor):
        self.pad_token_id = pad_token_id
        self.processor = processor

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        width = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for b, r in enumerate(rows):
            n = len(r["input_ids"])
            ids[b, :n] = torch.as_tensor(r["input_ids"])
            labels[b, :n] = torch.as_tensor(r["labels"])
            mask[b, :n] = 1
        batch = {"input_ids": ids, "labels": labels, "attention_mask": mask}
        images = []
        for r in rows:
            if r["image"]:
                with Image.open(r["image"]) as im:
                    images.append(im.convert("RGB"))
        if images:
            batch["pixel_values"] = self.processor(images=images, return_tensors="pt")["pixel_values"]
        return batch


def run_reference(work: Work, cfg, warmup: int, settings: ReferenceSettings, dtype: torch.dtype) -> dict:
    """Train `cfg.max_steps` steps (0: `cfg.epochs` epochs) of the row `cfg` describes (its data recipe,
    micro-batch, lr, LLM mode, LoRA settings, seed) with transformers.Trainer; time those after `warmup`.
    Returns this process's measurements."""
    from transformers import CLIPImageProcessor, Trainer, TrainerCallback, TrainingArguments

    t0 = time.perf_counter()
    model_cfg = cfg.model_config()
    torch.manual_seed(cfg.seed)
    model, tokenizer, image_token_id, patches = build_llava(
        work, dtype, model_cfg.llm, settings.attention, model_cfg.vision.feature_layer
    )
    set_trainability(model, model_cfg.llm.mode)
    train = hf_dataset(cfg.data, tokenizer, image_token_id, patches)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    meter = StepMeter(warmup=warmup, measures_wait=False)
    image_id = image_token_id

    class MeteredTrainer(Trainer):
        """Records what each micro-batch holds (the documented subclassing point), then trains as usual."""

        def training_step(self, model, inputs, num_items_in_batch=None):
            mask = inputs["attention_mask"]
            lengths = mask.sum(1).tolist()
            images = (inputs["input_ids"] == image_id).sum(1).div(patches).long().tolist()
            supervised = int((inputs["labels"][:, 1:] != IGNORE_INDEX).sum())
            meter.batch(lengths, images, mask.numel(), supervised)
            return super().training_step(model, inputs, num_items_in_batch)

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            meter.step_end()

    workers = settings.workers
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out,
            per_device_train_batch_size=cfg.micro_batch_size,
            max_steps=cfg.max_steps or -1,  # 0: one epoch, as the mllm side
            num_train_epochs=cfg.epochs,
            learning_rate=cfg.lr,
            lr_scheduler_type="constant",
            weight_decay=0.0,
            max_grad_norm=cfg.grad_clip,
            optim="adamw_torch_fused",
            bf16=dtype == torch.bfloat16,
            use_cpu=not torch.cuda.is_available(),
            train_sampling_strategy="group_by_length",
            dataloader_num_workers=workers,
            dataloader_persistent_workers=workers > 0,
            dataloader_prefetch_factor=2 if workers > 0 else None,
            remove_unused_columns=False,
            report_to="none",
            save_strategy="no",
            logging_strategy="no",
            disable_tqdm=True,
            seed=cfg.seed,
            torch_compile=settings.compile,
            ddp_backend="gloo" if world_size > 1 and not torch.cuda.is_available() else None,
        )
        trainer = MeteredTrainer(
            model=model,
            args=args,
            train_dataset=train,
            data_collator=ReferenceCollator(
                tokenizer.pad_token_id, CLIPImageProcessor.from_pretrained(work.vision)
            ),
            callbacks=[Clock()],
        )
        setup_s = time.perf_counter() - t0
        rss_setup = peak_rss_mb()
        trainer.train()
    result = meter.result()
    result.update(
        side="reference",
        rank=int(os.environ.get("RANK", "0")),
        world_size=world_size,
        setup_s=setup_s,
        settings={
            "trainer": "transformers.Trainer" + (f" (DDP, {world_size} processes)" if world_size > 1 else ""),
            "model": "LlavaForConditionalGeneration",
            **settings.to_dict(),
            "llm_mode": model_cfg.llm.mode,
            "sampling": "group_by_length (precomputed lengths)",
            "optim": "adamw_torch_fused",
            "dtype": str(dtype).removeprefix("torch."),
            "bf16_autocast": dtype == torch.bfloat16,
            "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        },
        peak_rss_mb=peak_rss_mb(),
        peak_rss_mb_after_setup=rss_setup,
        dataset_samples=len(train),
    )
    return result
