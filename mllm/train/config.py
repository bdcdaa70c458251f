"""The run configuration: one typed dataclass, stage presets, YAML files and command-line overrides.

Every field is one option. The command line is derived from the fields
(`micro_batch_size` → `--micro-batch-size`), a YAML file may set any of them,
and the command line wins over the file, which wins over the stage preset.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple

import yaml

from mllm.config import ConnectorConfig, LLMConfig, LoraSettings, ModelConfig, VisionConfig


@dataclass
class TrainConfig:
    """A training run (stage 0 Q-Former pretraining, stage 1 alignment or stage 2 instruction tuning)."""

    stage: int = 1
    """0 = BLIP-2 representation pretraining of a text-aware Q-Former on caption data against the frozen tower
    alone, no LLM (ITC + ITM + ITG); 1 = align the connector on caption data; 2 = instruction-tune connector + LLM."""
    vision: str = ""
    """Vision tower: HF model id or directory (taken from --init-from when empty in stage 2)."""
    vision_kind: str = "hf"
    """Vision tower implementation from the `mllm.vision` registry (`hf`, `efficientnet-lite0`)."""
    vision_feature_layer: int = -2
    """Hidden-state layer of the vision tower that feeds the connector."""
    vision_pool: int = 1
    """Average-pool the patch grid by this factor per side (fewer visual tokens)."""
    train_vision: bool = False
    """Also train the vision tower (frozen unless asked)."""
    image_aspect: Literal["square", "pad", "anyres"] = "square"
    """How images meet the tower's square input: square (squashed/cropped by its processor), pad (to a square
    first) or anyres (LLaVA-NeXT tiles + thumbnail, mlp connector). See docs/images.md."""
    grid_pinpoints: str = ""
    """anyres: grid resolutions as HEIGHTxWIDTH pixels, comma-separated (e.g. 672x336,336x672,672x672); empty =
    every grid of at most --max-tiles tiles."""
    max_tiles: int = 4
    """anyres without --grid-pinpoints: the most tiles an image is cut into (plus its thumbnail)."""
    min_pixels: int = 0
    """Images with fewer pixels are upscaled to this many (aspect kept); 0 = off."""
    max_pixels: int = 0
    """Images with more pixels are downscaled to this many (aspect kept); 0 = off."""
    max_image_tokens: int = 0
    """A sample whose images need more visual tokens is skipped and reported by id; 0 = no limit."""
    llm: str = ""
    """Causal LM: HF model id or directory (taken from --init-from when empty in stage 2)."""
    trust_remote_code: bool = False
    """Run Python code shipped inside the vision/LLM model folders (transformers' trust_remote_code). Off: a
    model that needs its own code fails to load instead of running it."""
    llm_mode: Literal["frozen", "full", "lora", "qlora"] = "frozen"
    """How the LLM trains: frozen (stage 1), full, lora, or qlora (4-bit NF4 base + LoRA)."""
    lora_r: int = LoraSettings.r
    """LoRA rank."""
    lora_alpha: int = LoraSettings.alpha
    """LoRA scaling numerator (scale = alpha / r)."""
    lora_dropout: float = LoraSettings.dropout
    """Dropout on the LoRA branch."""
    lora_target_modules: list[str] = dataclasses.field(default_factory=lambda: ["all-linear"])
    """LLM module names to adapt; `all-linear` = every linear layer but the head."""
    connector: str = "mlp"
    """Connector kind from the `mllm.connectors` registry: mlp, qformer, resampler."""
    projector: str = "mlp2x_gelu"
    """For the mlp connector: `linear` or `mlpNx_gelu`."""
    pixel_shuffle: int = 1
    """For the mlp connector: merge s×s neighbouring patches into one token of s² width before projecting (s² fewer
    visual tokens; Idefics3 / nanoVLM). 1 = off; s must divide the tower's patch grid side."""
    num_queries: int = 32
    """For qformer / resampler: learned queries = visual tokens per image."""
    connector_layers: int = 2
    """For qformer / resampler: transformer layers."""
    connector_width: int = 0
    """For qformer / resampler: internal width (0 = the vision feature width)."""
    connector_heads: int = 8
    """For qformer / resampler: attention heads (must divide the width)."""
    qformer_text: bool = False
    """For qformer: the text-aware Q-Former (queries and text share self-attention, BERT-style); off = queries only."""
    qformer_init: str = ""
    """For qformer: a BERT-architecture checkpoint (path or id) that initialises the Q-Former — its shape, weights
    (cross-attention stays random) and tokenizer; e.g. all-MiniLM-L6-v2. Empty = random."""
    qformer_tokenizer: str = ""
    """For a text-aware qformer without --qformer-init: its tokenizer (path or id)."""
    qformer_cross_attention_frequency: int = 1
    """For qformer: a cross-attention to the image features every N layers (BLIP-2: 2; halves their cost)."""
    instruction_aware: bool = False
    """For a text-aware qformer (InstructBLIP): the user turn's text enters the Q-Former beside the queries."""
    data: str = ""
    """Data recipe (YAML) or a LLaVA-format .json / .jsonl file."""
    image_root: str = ""
    """Folder the data's image paths resolve against, as LLaVA's --image_folder (empty = the recipe's image_root; for a
    bare .json / .jsonl file, its own folder). Image paths may not leave it."""
    template: str = ""
    """Chat template override (empty = the recipe's)."""
    max_length: int = 0
    """Token budget per sample override (0 = the recipe's)."""
    output: str = ""
    """Output directory: checkpoints, metrics.jsonl, TensorBoard events, run_config.yaml, curves."""
    max_steps: int = 0
    """Optimizer steps to run; 0 = as many as --epochs take."""
    epochs: float = 1.0
    """Passes over the data when --max-steps is 0."""
    micro_batch_size: int = 16
    """Samples per process per forward pass."""
    grad_accum: int = 0
    """Micro-batches accumulated per optimizer step; 0 = reach --global-batch-size."""
    global_batch_size: int = 256
    """Samples per optimizer step over all processes, used only when --grad-accum is 0."""
    lr: float = 1e-3
    """Peak learning rate (of the LLM in stage 2; of the connector in stage 1)."""
    connector_lr: float = 0.0
    """Peak learning rate of the connector in stage 2; 0 = --lr."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    warmup_ratio: float = 0.03
    """Fraction of the steps spent warming the learning rate up linearly from 0."""
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    """Decay after warm-up: cosine to 0, linear to 0, or constant."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0 = off)."""
    grad_checkpointing: bool = False
    """Recompute LLM activations in the backward pass (less memory, slower steps)."""
    dtype: Literal["auto", "bf16", "fp32"] = "auto"
    """Compute dtype: bf16 where the hardware runs it fast, else fp32."""
    attention: Literal["auto", "eager", "sdpa", "flash_attention_2"] = "auto"
    """The LLM's attention kernel while training. auto: flash_attention_2 on CUDA when flash-attn is installed;
    on a CPU, eager when no training row exceeds 256 tokens (there its backward beats SDPA's flash kernel),
    else sdpa."""
    seed: int = 0
    """Seeds the connector initialisation, data order and dropout."""
    save_every: int = 500
    """Checkpoint every N optimizer steps (0 = only at the end)."""
    keep_last: int = 2
    """Keep the newest K checkpoints (0 = keep all)."""
    resume: str = "auto"
    """`auto`: continue from the newest complete checkpoint in --output if any; `latest`: must continue;
    `no`: start over; or a checkpoint directory. `--resume` alone = latest."""
    init_from: str = ""
    """Stage 2: a stage-1 output directory or checkpoint whose connector starts this run; stage 1: a stage-0 one
    (its pretrained Q-Former; the projection into the LLM starts new)."""
    zero: str = ""
    """DeepSpeed config JSON (zero_configs/z2.json, z3.json, z3_offload.json); empty = built-in ZeRO-2."""
    num_workers: int = 2
    """DataLoader worker processes that load and preprocess images ahead of the step."""
    max_tokens: int = 0
    """Token budget of a micro-batch (rows × its longest sample, image tokens included): as many length-grouped
    samples as fit, at most micro_batch_size; 0 = always micro_batch_size samples."""
    pad_to_multiple_of: int = 16
    """Pad each micro-batch's rows to a multiple of this many tokens: few distinct shapes (on CPU, oneDNN keeps a
    matmul kernel per shape, and one per length grows memory), tensor-core friendly on GPU; 1 = no rounding."""
    packing: Literal["auto", "on", "off"] = "auto"
    """Sequence packing: several whole samples per row (first-fit-decreasing), position ids restarting per sample,
    no attention across samples (flash-attn varlen on CUDA, an exact block-diagonal mask otherwise). auto = on."""
    pack_row_tokens: int = 0
    """Token budget of a packed row; 0 = the longest sample of its micro-batch (rows never grow longer than the
    padded batch would be, so attention never costs more)."""
    feature_cache: str = ""
    """Directory of the on-disk frozen vision-feature cache: each image's tower features are computed once
    (before the first step, counted in the run's time) and read from there ever after; keyed by the tower's
    identity and weights, feature layer, preprocessing and the image's bytes. Empty = off. Not with --train-vision."""
    compile: Literal["auto", "on", "off"] = "auto"
    """torch.compile each LLM decoder layer (dynamic shapes) with an explicit attention mask on every batch.
    auto = off (compiling did not pay within a run where it was measured: docs/measurements.md)."""
    loss_chunk_size: int = 2048
    """The loss's vocabulary head runs over at most this many supervised positions at a time, each chunk's logits
    recomputed in backward instead of kept (peak memory chunk × vocabulary); 0 = all at once. The logits are only
    ever computed at supervised positions (image and prompt tokens never reach the head)."""
    prefetch_factor: int = 4
    """Micro-batches each DataLoader worker keeps ready ahead of the step (workers persist across epochs)."""
    causal_kernel: bool = True
    """Micro-batches carry no attention mask (right padding never precedes a real token), so SDPA / flash-attn run
    their causal kernels, skipping the score blocks above the diagonal; false = an explicit padding mask."""
    log_every: int = 1
    """Refresh the progress bar every N steps (metrics.jsonl always gets every step)."""
    max_skipped_steps: int = 5
    """A step whose loss or gradient norm is NaN/Inf (on any rank) is skipped and logged; this many skipped in a
    row stop the run (nothing saved after them)."""
    mir_data: str = ""
    """Caption or QA data (recipe, .json or .jsonl; an image and a reference answer per sample) on which the run
    measures the Modality Integration Rate (`mllm eval --task alignment`, docs/blip2.md) as it trains: before the
    first step, every --mir-every steps and at the end, into mir.jsonl and TensorBoard. Empty = off. Stages 1, 2."""
    mir_every: int = 0
    """With --mir-data: also measure MIR every N optimizer steps (0 = before the first step and at the end only)."""
    no_verify: bool = False
    """Resume / --init-from without checking the checkpoint's files against the hashes recorded when they were
    saved (sizes are still checked, weights still must be finite)."""

    def __post_init__(self):
        if isinstance(self.lora_target_modules, str):
            self.lora_target_modules = [m for m in self.lora_target_modules.split(",") if m]
        parse_pinpoints(self.grid_pinpoints)  # a malformed --grid-pinpoints fails here, by name
        check(self)

    def check_complete(self) -> None:
        """The fields a run cannot start without (checked after --init-from filled what it could)."""
        needed = ("vision", "data", "output") if self.stage == 0 else ("vision", "llm", "data", "output")
        missing = [f"--{n.replace('_', '-')}" for n in needed if not getattr(self, n)]
        if missing:
            raise ValueError(
                f"missing {', '.join(missing)} (set them on the command line or in the YAML config)"
            )

    def model_config(self) -> ModelConfig:
        """The `ModelConfig` this run trains (saved in every checkpoint)."""
        target = self.lora_target_modules
        return ModelConfig(
            vision=VisionConfig(
                path=self.vision,
                kind=self.vision_kind,
                feature_layer=self.vision_feature_layer,
                pool=self.vision_pool,
                trainable="full" if self.train_vision else "frozen",
                image_aspect=self.image_aspect,
                grid_pinpoints=parse_pinpoints(self.grid_pinpoints),
                max_tiles=self.max_tiles,
                min_pixels=self.min_pixels,
                max_pixels=self.max_pixels,
                max_image_tokens=self.max_image_tokens,
            ),
            connector=ConnectorConfig(
                kind=self.connector,
                projector=self.projector,
                pixel_shuffle=self.pixel_shuffle,
                num_queries=self.num_queries,
                num_layers=self.connector_layers,
                hidden_size=self.connector_width,
                num_heads=self.connector_heads,
                qformer_text=self.qformer_text,
                qformer_init=self.qformer_init,
                qformer_tokenizer=self.qformer_tokenizer,
                cross_attention_frequency=self.qformer_cross_attention_frequency,
                instruction_aware=self.instruction_aware,
            ),
            llm=LLMConfig(
                path=self.llm,
                mode=self.llm_mode,
                trust_remote_code=self.trust_remote_code,
                lora=LoraSettings(
                    r=self.lora_r,
                    alpha=self.lora_alpha,
                    dropout=self.lora_dropout,
                    target_modules="all-linear" if target == ["all-linear"] else list(target),
                ),
            ),
            dtype=self.dtype,
            attn_implementation=self.attention,
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class Rule(NamedTuple):
    """One check of a `TrainConfig`: `holds(cfg)` must be true, else the run is refused with `message`, a
    `str.format` template over the config's fields (`{lr}`, `{schedule!r}`)."""

    holds: Callable[[TrainConfig], bool]
    message: str


RULES: tuple[Rule, ...] = (
    Rule(lambda c: c.stage in (0, 1, 2), "stage must be 0, 1 or 2, got {stage}"),
    Rule(
        lambda c: c.llm_mode in ("frozen", "full", "lora", "qlora"),
        "llm_mode must be frozen|full|lora|qlora, got {llm_mode!r}",
    ),
    Rule(
        lambda c: c.schedule in ("cosine", "linear", "constant"),
        "schedule must be cosine|linear|constant, got {schedule!r}",
    ),
    Rule(
        lambda c: c.dtype in ("auto", "bf16", "fp32"),
        "dtype must be auto|bf16|fp32 (fp16 needs loss scaling), got {dtype!r}",
    ),
    Rule(
        lambda c: c.attention in ("auto", "eager", "sdpa", "flash_attention_2"),
        "attention must be auto|eager|sdpa|flash_attention_2, got {attention!r}",
    ),
    Rule(
        lambda c: (
            c.connector_width >= 0
            and c.connector_layers >= 1
            and c.connector_heads >= 1
            and (c.connector_width or c.connector_heads) % c.connector_heads == 0
        ),
        "connector_width ({connector_width}, 0 = the vision width) must be >= 0 and divisible by connector_heads "
        "({connector_heads}); connector_layers must be >= 1",
    ),
    Rule(lambda c: c.micro_batch_size >= 1, "micro_batch_size must be >= 1"),
    Rule(lambda c: c.pad_to_multiple_of >= 1, "pad_to_multiple_of must be >= 1 (1 = no rounding)"),
    Rule(
        lambda c: c.packing in ("auto", "on", "off") and c.compile in ("auto", "on", "off"),
        "packing and compile must be auto|on|off, got {packing!r} and {compile!r}",
    ),
    Rule(
        lambda c: c.pack_row_tokens >= 0 and c.loss_chunk_size >= 0 and c.prefetch_factor >= 1,
        "pack_row_tokens and loss_chunk_size must be >= 0 (0 = automatic / off), prefetch_factor >= 1",
    ),
    Rule(
        lambda c: not (c.feature_cache and c.train_vision),
        "--feature-cache serves a frozen tower's features; with --train-vision the tower changes every step, so "
        "its features cannot be cached: drop one of the two",
    ),
    Rule(lambda c: c.max_tokens >= 0, "max_tokens must be >= 0 (0 = no token budget)"),
    Rule(
        lambda c: not c.feature_cache or (c.image_aspect == "square" and not (c.min_pixels or c.max_pixels)),
        "--feature-cache stores one tower output per image file; with --image-aspect pad/anyres or a pixel budget "
        "the tower sees other pixels: drop --feature-cache",
    ),
    Rule(
        lambda c: c.grad_accum >= 0 and c.global_batch_size >= 1,
        "grad_accum must be >= 0 and global_batch_size >= 1",
    ),
    Rule(lambda c: c.max_steps >= 0 and c.epochs > 0, "max_steps must be >= 0 and epochs > 0"),
    Rule(lambda c: c.lr > 0 and c.connector_lr >= 0, "lr must be > 0 and connector_lr >= 0"),
    Rule(lambda c: 0 <= c.warmup_ratio < 1, "warmup_ratio must be in [0, 1), got {warmup_ratio}"),
    Rule(lambda c: c.grad_clip >= 0 and c.weight_decay >= 0, "grad_clip and weight_decay must be >= 0"),
    Rule(lambda c: c.save_every >= 0 and c.keep_last >= 0, "save_every and keep_last must be >= 0"),
    Rule(lambda c: c.log_every >= 1 and c.num_workers >= 0, "log_every must be >= 1 and num_workers >= 0"),
    Rule(lambda c: c.max_skipped_steps >= 1, "max_skipped_steps must be >= 1"),
    Rule(
        lambda c: c.mir_every >= 0 and (c.mir_data or not c.mir_every),
        "--mir-every {mir_every} needs --mir-data (the samples MIR is measured on), and must be >= 0",
    ),
    Rule(
        lambda c: c.stage != 0 or not c.mir_data,
        "--mir-data measures visual tokens inside the LLM; stage 0 loads none: drop --mir-data",
    ),
    Rule(
        lambda c: c.lora_r >= 1 and 0 <= c.lora_dropout < 1, "lora_r must be >= 1 and lora_dropout in [0, 1)"
    ),
    Rule(
        lambda c: c.stage == 2 or c.llm_mode == "frozen",
        "stage 1 trains only the connector: llm_mode must be frozen",
    ),
    Rule(
        lambda c: c.stage != 0 or not c.init_from,
        "init_from is for stages 1 (from a stage-0 Q-Former) and 2 (from a stage-1 connector); stage 0 starts "
        "from a BERT: --qformer-init",
    ),
    Rule(
        lambda c: c.stage != 0 or (c.connector == "qformer" and c.qformer_text),
        "stage 0 pretrains the text-aware Q-Former: --connector qformer --qformer-text (and --qformer-init)",
    ),
    Rule(
        lambda c: c.stage != 0 or (c.packing == "off" and c.compile != "on" and not c.instruction_aware),
        "stage 0 reads one caption per row and has no LLM: --packing off, no --compile on, no --instruction-aware",
    ),
)
"""What every `TrainConfig` must satisfy, checked in this order on construction (the first broken rule is the
error). A new option's check is one line here; tests/test_train_config_rules.py wants a violating example of it."""


def check(cfg: TrainConfig) -> None:
    """Raise ValueError with the message of the first rule in `RULES` that `cfg` breaks; return if none."""
    for rule in RULES:
        if not rule.holds(cfg):
            raise ValueError(rule.message.format_map(vars(cfg)))


def parse_pinpoints(text: str) -> list[list[int]]:
    """`672x336,336x672` → [[672, 336], [336, 672]] ((height, width) pairs); empty → []."""
    pairs = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        h, sep, w = part.lower().partition("x")
        if not (sep and h.isdigit() and w.isdigit()):
            raise ValueError(f"grid_pinpoints: {part!r} is not HEIGHTxWIDTH (e.g. 672x336)")
        pairs.append([int(h), int(w)])
    return pairs


STAGE_PRESETS: dict[int, dict[str, Any]] = {
    # BLIP-2 stage 1 (representation): lr 1e-4, weight decay 0.05, AdamW, cosine; one caption per row.
    0: dict(
        llm_mode="frozen",
        lr=1e-4,
        weight_decay=0.05,
        global_batch_size=256,
        micro_batch_size=32,
        epochs=1.0,
        packing="off",
    ),  # fmt: skip
    # LLaVA-1.5 pretrain: projector only, lr 1e-3, cosine, 3% warm-up, global batch 256.
    1: dict(
        llm_mode="frozen", lr=1e-3, connector_lr=0.0, global_batch_size=256, micro_batch_size=16, epochs=1.0
    ),
    # LLaVA-1.5 LoRA fine-tune: r 128, alpha 256, lr 2e-4, projector lr 2e-5, global batch 128.
    2: dict(
        llm_mode="lora", lr=2e-4, connector_lr=2e-5, global_batch_size=128, micro_batch_size=16, epochs=1.0
    ),
}


FLAG_ALIASES: dict[str, tuple[str, ...]] = {"image_root": ("--image-folder",)}
"""Other spellings of a field's option (LLaVA's names users already know)."""


def _field_types() -> dict[str, Any]:
    return typing.get_type_hints(TrainConfig)


def _parse_bool(text: str) -> bool:
    low = str(text).lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def add_config_arguments(parser: argparse.ArgumentParser, include_stage: bool = True) -> None:
    """One option per `TrainConfig` field, named after it, help from its docstring; plus --config."""
    parser.add_argument("--config", help="YAML file of run settings (command-line options override it)")
    docs = field_docs()
    for f in dataclasses.fields(TrainConfig):
        if f.name == "stage" and not include_stage:
            continue
        flag = "--" + f.name.replace("_", "-")
        hint = _field_types()[f.name]
        kwargs: dict[str, Any] = dict(dest=f.name, default=argparse.SUPPRESS, help=docs.get(f.name, ""))
        origin = typing.get_origin(hint)
        if hint is bool:
            kwargs.update(nargs="?", const=True, type=_parse_bool, metavar="BOOL")
        elif origin is Literal:
            kwargs.update(choices=list(typing.get_args(hint)))
        elif origin is list:
            kwargs.update(nargs="+")
        else:
            kwargs.update(type=hint)
        if f.name == "resume":
            kwargs.update(nargs="?", const="latest")
        parser.add_argument(flag, *FLAG_ALIASES.get(f.name, ()), **kwargs)


def field_docs() -> dict[str, str]:
    """Field name → its docstring, read from this module's source (the single place they are written)."""
    tree = ast.parse(inspect.getsource(TrainConfig))
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:], strict=False):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
        ):
            docs[node.target.id] = " ".join(str(nxt.value.value).split()).replace("%", "%%")
    return docs


def load_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no such run config file")
    data = yaml.safe_load(p.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{p}: a run config must be a mapping of option: value, got {type(data).__name__}")
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    data = {k.replace("-", "_"): v for k, v in data.items()}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{p}: unknown run settings {unknown}; known: {sorted(known)}")
    return data


def resolve_config(
    args: argparse.Namespace | None = None, stage: int | None = None, **overrides
) -> TrainConfig:
    """Preset of the stage ← YAML file (--config) ← command-line options ← keyword overrides."""
    cli = dict(vars(args)) if args is not None else {}
    config_file = cli.pop("config", None)
    from_file = load_yaml(config_file) if config_file else {}
    given = (stage, cli.pop("stage", None), from_file.get("stage"))
    stage = int(next((s for s in given if s is not None), 1))  # stage 0 is a stage, not "unset"
    if from_file.get("stage") not in (None, stage):
        raise ValueError(
            f"{config_file} is a stage-{from_file['stage']} config but this is a stage-{stage} run"
        )
    if stage not in STAGE_PRESETS:
        raise ValueError(f"stage must be 0, 1 or 2, got {stage}")
    values: dict[str, Any] = dict(STAGE_PRESETS[stage])
    values.update(from_file)
    values.update(cli)
    values.update(overrides)
    values["stage"] = stage
    return TrainConfig(**values)


def save_yaml(cfg: TrainConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
