"""Typed configuration of the multimodal model: vision tower, connector, LLM.

Everything a checkpoint *is* lives here and is saved beside its weights, so
nothing is ever inferred from a folder name.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any, Literal

IMAGE_TOKEN_ID = -200
"""Sentinel id for an image-token position in `input_ids` (never sent to the embedding table)."""

IMAGE_PLACEHOLDER = "<image>"
"""The placeholder users write in their text; each one is one image."""

IGNORE_INDEX = -100
"""Label of a position the loss skips (prompt, image tokens, padding): PyTorch's `cross_entropy` default."""

FORMAT_VERSION = 1
"""Version of the saved model config / checkpoint layout."""


@dataclass
class VisionConfig:
    """The vision tower. Frozen by default."""

    path: str = ""
    """HF model id or directory (any transformers vision model), or a path for other kinds."""
    kind: str = "hf"
    """Tower implementation from the `mllm.vision` registry: `hf`, `blip2` (a BLIP-2 / InstructBLIP checkpoint's
    vision model, its last hidden state whole) or `efficientnet-lite0`."""
    feature_layer: int = -2
    """Hidden-state layer whose patch features feed the connector (`hf` towers)."""
    pool: int = 1
    """Average-pool the patch grid by this factor per side (1 = keep every patch)."""
    trainable: Literal["frozen", "full"] = "frozen"
    image_aspect: Literal["square", "pad", "anyres"] = "square"
    """How an image meets the tower's square input (`mllm.data.layout`): `square` (the tower's processor squashes
    or crops it), `pad` (padded to a square first) or `anyres` (LLaVA-NeXT tiles + thumbnail; mlp connector)."""
    grid_pinpoints: list[list[int]] = field(default_factory=list)
    """`anyres`: grid resolutions (height, width) in pixels, multiples of the tower's input size; empty = every grid
    of at most `max_tiles` tiles."""
    max_tiles: int = 4
    """`anyres` without `grid_pinpoints`: the most tiles an image is cut into (besides its thumbnail)."""
    min_pixels: int = 0
    """Images with fewer pixels are upscaled to this many (aspect ratio kept); 0 = off."""
    max_pixels: int = 0
    """Images with more pixels are downscaled to this many (aspect ratio kept); 0 = off."""
    max_image_tokens: int = 0
    """Visual tokens one sample's images may take in all; a sample needing more is refused by id. 0 = no limit."""

    def __post_init__(self):
        if self.trainable not in ("frozen", "full"):
            raise ValueError(f"vision.trainable must be frozen|full, got {self.trainable!r}")
        if self.pool < 1:
            raise ValueError(f"vision.pool must be >= 1, got {self.pool}")
        if self.image_aspect not in ("square", "pad", "anyres"):
            raise ValueError(f"vision.image_aspect must be square|pad|anyres, got {self.image_aspect!r}")
        if self.max_tiles < 1:
            raise ValueError(f"vision.max_tiles must be >= 1, got {self.max_tiles}")
        if min(self.min_pixels, self.max_pixels, self.max_image_tokens) < 0:
            raise ValueError("vision.min_pixels, max_pixels and max_image_tokens must be >= 0 (0 = off)")
        if self.max_pixels and self.min_pixels > self.max_pixels:
            raise ValueError(f"vision.min_pixels {self.min_pixels} > max_pixels {self.max_pixels}")
        if any(len(p) != 2 or min(p) < 1 for p in self.grid_pinpoints):
            raise ValueError(
                f"vision.grid_pinpoints must be [height, width] pairs, got {self.grid_pinpoints}"
            )


@dataclass
class ConnectorConfig:
    """The trainable bridge from vision features to LLM embeddings."""

    kind: str = "mlp"
    """`mlp` (LLaVA projector), `qformer` (BLIP-2) or `resampler` (perceiver)."""
    projector: str = "mlp2x_gelu"
    """For `mlp`: `linear` or `mlp{N}x_gelu` (N linear layers with GELU between)."""
    pixel_shuffle: int = 1
    """For `mlp`: merge each s×s block of neighbouring patches into one token of s² times the width before
    projecting (Idefics3 / nanoVLM): s² fewer visual tokens per image. 1 = off; s must divide the patch grid's side."""
    num_queries: int = 32
    """For `qformer` / `resampler`: number of learned queries = visual tokens per image."""
    num_layers: int = 2
    """For `qformer` / `resampler`: transformer layers."""
    hidden_size: int = 0
    """For `qformer` / `resampler`: internal width (0 = the vision feature width)."""
    num_heads: int = 8
    """For `qformer` / `resampler`: attention heads (must divide hidden_size)."""
    intermediate_size: int = 0
    """For `qformer`: feed-forward width (0 = 4 × hidden_size)."""
    cross_attention_frequency: int = 1
    """For `qformer`: a cross-attention to the image features every N layers (BLIP-2: 2)."""
    qformer_text: bool = False
    """For `qformer`: text-aware Q-Former — queries and text tokens share self-attention (BERT-style, with a word
    embedding table and a text feed-forward beside the queries' own); false = queries only."""
    qformer_init: str = ""
    """For `qformer`: a BERT-architecture HF checkpoint (path or id) whose embeddings, self-attention and
    feed-forward weights start the Q-Former (cross-attention stays random); its config sets the Q-Former's shape
    and its tokenizer becomes the Q-Former's. Empty = random initialisation."""
    qformer_tokenizer: str = ""
    """For a text-aware `qformer`: the tokenizer of its text (path or id); empty = `qformer_init`'s."""
    vocab_size: int = 0
    """For a text-aware `qformer`: rows of its word-embedding table (0 = the tokenizer's size)."""
    instruction_aware: bool = False
    """For a text-aware `qformer` (InstructBLIP): the user turn's text enters the Q-Former beside the queries."""
    instruction_max_tokens: int = 128
    """Instruction tokens kept (Q-Former tokenizer) when `instruction_aware`."""

    def __post_init__(self):
        if self.kind == "mlp" and not (
            self.projector == "linear" or re.fullmatch(r"mlp(\d+)x_gelu", self.projector)
        ):
            raise ValueError(f"connector.projector must be 'linear' or 'mlpNx_gelu', got {self.projector!r}")
        if self.pixel_shuffle < 1:
            raise ValueError(f"connector.pixel_shuffle must be >= 1 (1 = off), got {self.pixel_shuffle}")
        if self.pixel_shuffle > 1 and self.kind != "mlp":
            raise ValueError(
                f"connector.pixel_shuffle is a setting of the mlp connector; {self.kind!r} already sets its token "
                "count with num_queries"
            )
        if self.num_queries < 1 or self.num_layers < 1:
            raise ValueError("connector.num_queries and connector.num_layers must be >= 1")
        if self.instruction_aware and not (self.kind == "qformer" and self.qformer_text):
            raise ValueError(
                "connector.instruction_aware needs the text-aware Q-Former (connector qformer with qformer_text)"
            )
        if (self.qformer_text or self.qformer_init) and self.kind != "qformer":
            raise ValueError(
                f"qformer_text / qformer_init are settings of the qformer connector, not {self.kind!r}"
            )
        if (
            self.cross_attention_frequency < 1
            or self.intermediate_size < 0
            or self.instruction_max_tokens < 1
        ):
            raise ValueError(
                "connector.cross_attention_frequency and instruction_max_tokens must be >= 1, intermediate_size >= 0"
            )


@dataclass
class LoraSettings:
    """The LLM's LoRA adapter. The defaults are LLaVA-1.5's LoRA fine-tune, and the only copy of them: the run
    config's `--lora-r` / `--lora-alpha` / `--lora-dropout` default to these."""

    r: int = 128
    alpha: int = 256
    dropout: float = 0.05
    target_modules: list[str] | str = "all-linear"
    """Module names to adapt, or `all-linear` (every linear layer of the LLM but its head)."""


@dataclass
class LLMConfig:
    """The causal language model."""

    path: str = ""
    """HF model id or directory of any causal LM."""
    mode: Literal["frozen", "full", "lora", "qlora"] = "frozen"
    lora: LoraSettings = field(default_factory=LoraSettings)
    trust_remote_code: bool = False
    """Off unless asked: loading code from a model repo runs arbitrary Python."""

    def __post_init__(self):
        if self.mode not in ("frozen", "full", "lora", "qlora"):
            raise ValueError(f"llm.mode must be frozen|full|lora|qlora, got {self.mode!r}")
        if isinstance(self.lora, dict):
            self.lora = LoraSettings(**self.lora)


@dataclass
class ModelConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    connector: ConnectorConfig = field(default_factory=ConnectorConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    """Compute dtype of the frozen backbones; `auto` = bf16 where the hardware runs it fast, else fp32."""
    attn_implementation: str = "auto"
    """`auto` = flash_attention_2 when flash-attn imports and CUDA is present, else sdpa."""

    def __post_init__(self):
        for name, cls in (("vision", VisionConfig), ("connector", ConnectorConfig), ("llm", LLMConfig)):
            value = getattr(self, name)
            if isinstance(value, dict):
                setattr(self, name, from_dict(cls, value))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        return from_dict(cls, data)


def from_dict(cls, data: dict[str, Any]):
    """Build dataclass `cls` from a dict, rejecting unknown keys by name."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} keys: {unknown}; known: {sorted(names)}")
    return cls(**data)
