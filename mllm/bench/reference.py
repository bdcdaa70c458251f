"""The reference side: `transformers.LlavaForConditionalGeneration` trained by `transformers.Trainer`.

Assembled from the same backbone directories (vision feature layer -2, CLS
dropped by the `default` strategy, `image_token_id` = the tokenizer's `<image>`),
trained at Trainer's best settings for this work: `group_by_length` with
precomputed lengths, bf16, fused AdamW, one persistent dataloader worker that
opens and preprocesses the images, labels only on assistant tokens (the same
ids and labels as the mllm side, `<image>` expanded to the patch count as the
LLaVA processor does). Stage 1 trains the projector, stage 2 projector + LLM.
"""

from __future__ import annotations

import tempfile
import time
from typing import Any

import torch
from PIL import Image

from mllm.bench.meter import StepMeter, peak_rss_mb
from mllm.bench.work import Work, encoded_item, stage_dataset
from mllm.config import IMAGE_PLACEHOLDER, IMAGE_TOKEN_ID

IGNORE_INDEX = -100


def build_llava(work: Work, dtype: torch.dtype):
    """A LlavaForConditionalGeneration whose tower, LLM and head are the loaded backbones; the projector is new."""
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
    vision = CLIPVisionModel.from_pretrained(work.vision, dtype=dtype, attn_implementation="sdpa")
    llm = AutoModelForCausalLM.from_pretrained(work.llm, dtype=dtype, attn_implementation="sdpa")
    patches = (vision.config.image_size // vision.config.patch_size) ** 2
    config = LlavaConfig(
        vision_config=vision.config,
        text_config=llm.config,
        image_token_id=image_token_id,
        image_seq_length=patches,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )
    config._attn_implementation = "sdpa"
    with torch.device("meta"):  # the shell only: every module is replaced by a loaded or freshly built one
        model = LlavaForConditionalGeneration(config)
    model.model.vision_tower = vision
    model.model.language_model = llm.model
    model.lm_head = llm.lm_head
    model.model.multi_modal_projector = LlavaMultiModalProjector(config).to(dtype)
    model.config.use_cache = False
    return model, tokenizer, image_token_id, patches


def set_trainability(model, stage: int) -> None:
    model.requires_grad_(False)
    model.model.multi_modal_projector.requires_grad_(True)
    if stage == 2:
        model.model.language_model.requires_grad_(True)
        model.lm_head.requires_grad_(True)


def hf_dataset(work: Work, stage: int, tokenizer, image_token_id: int, patches: int, samples: int | None):
    """A `datasets.Dataset` of ids, labels, image path and precomputed `length` (what group_by_length reads)."""
    import datasets

    ds = stage_dataset(work, stage, tokenizer, patches, preprocess=None, samples=samples)
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
    ids (pad token) and labels (-100), and stacks the pixel values of the samples that have an image."""

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


def run_reference(
    work: Work,
    stage: int,
    steps: int,
    warmup: int,
    batch_size: int,
    lr: float,
    dtype: torch.dtype,
    samples: int | None,
    workers: int = 1,
    seed: int = 0,
    compile: bool = False,
) -> dict:
    from transformers import CLIPImageProcessor, Trainer, TrainerCallback, TrainingArguments

    torch.manual_seed(seed)
    model, tokenizer, image_token_id, patches = build_llava(work, dtype)
    set_trainability(model, stage)
    train = hf_dataset(work, stage, tokenizer, image_token_id, patches, samples)
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

    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out,
            per_device_train_batch_size=batch_size,
            max_steps=warmup + steps if steps > 0 else -1,  # 0 timed steps asked = one full epoch
            num_train_epochs=1,
            learning_rate=lr,
            lr_scheduler_type="constant",
            weight_decay=0.0,
            max_grad_norm=1.0,
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
            seed=seed,
            torch_compile=compile,
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
        t = time.perf_counter()
        out_state = trainer.train()
        wall = time.perf_counter() - t
    result = meter.result()
    result.update(
        side="reference",
        settings={
            "trainer": "transformers.Trainer",
            "model": "LlavaForConditionalGeneration",
            "attn": "sdpa",
            "sampling": "group_by_length (precomputed lengths)",
            "dataloader_workers": workers,
            "optim": "adamw_torch_fused",
            "dtype": str(dtype).removeprefix("torch."),
            "bf16_autocast": dtype == torch.bfloat16,
            "torch_compile": compile,
        },
        train_wall_s=wall,
        train_loss=out_state.training_loss,
        peak_rss_mb=peak_rss_mb(),
        dataset_samples=len(train),
    )
    return result
