"""BLIP-2 Querying Transformer: K learned queries cross-attend to the vision features.

Two forms, both transformers' own Q-Former modules:

- queries only (the default): `Blip2QFormerModel`; the K query outputs, mapped to the LLM width by a linear
  layer, are the K visual tokens of an image.
- text-aware (`qformer_text`): `InstructBlipQFormerModel` — a BERT whose queries and text tokens share the
  self-attention layers, with cross-attention to the image on the query positions only and a feed-forward of
  their own for the queries (`intermediate_query` / `output_query`) beside the text's (`intermediate` /
  `output`). `encode(..., mask=)` runs queries + text under BLIP-2's per-objective attention masks; with
  `instruction_aware` (InstructBLIP) the instruction text rides beside the queries and only the query outputs
  become visual tokens.

`qformer_init` starts either form from a BERT-architecture checkpoint (BLIP-2: bert-base-uncased): embeddings,
self-attention and feed-forward (copied into both the text and the query feed-forward) come from BERT, the
cross-attention layers are new.
"""

from __future__ import annotations

import dataclasses
import logging
import re

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoTokenizer,
    Blip2QFormerConfig,
    Blip2QFormerModel,
    InstructBlipQFormerConfig,
    InstructBlipQFormerModel,
)

from mllm.config import ConnectorConfig
from mllm.connectors.base import Connector

log = logging.getLogger(__name__)

MASKS = ("bidirectional", "causal", "unimodal")
"""BLIP-2's self-attention masks over [queries; text]: `bidirectional` (ITM: all see all), `causal` (ITG: queries
see queries, text sees the queries and the text before it), `unimodal` (ITC: queries and text never see each
other)."""

# What transformers' Q-Former configs fix and a BERT init must match.
_FIXED = {"hidden_act": "gelu", "layer_norm_eps": 1e-12, "max_position_embeddings": 512}


def load_qformer_tokenizer(cfg: ConnectorConfig):
    """The tokenizer of a text-aware Q-Former: `qformer_tokenizer`, else `qformer_init`'s."""
    source = cfg.qformer_tokenizer or cfg.qformer_init
    if not source:
        raise ValueError(
            "a text-aware Q-Former needs a tokenizer: give --qformer-init (a BERT checkpoint, its tokenizer comes "
            "with it) or --qformer-tokenizer"
        )
    return AutoTokenizer.from_pretrained(source)


def resolve_qformer_config(cfg: ConnectorConfig) -> ConnectorConfig:
    """`cfg` with every size explicit: from the BERT config of `qformer_init` when given, the vocabulary from the
    tokenizer of a text-aware Q-Former. A checkpoint saves the result, so loading it needs no BERT."""
    updates = {}
    if cfg.qformer_init:
        bert = AutoConfig.from_pretrained(cfg.qformer_init)
        wrong = {k: getattr(bert, k, None) for k, v in _FIXED.items() if getattr(bert, k, None) != v}
        if bert.model_type != "bert" or wrong:
            raise ValueError(
                f"--qformer-init {cfg.qformer_init}: a '{bert.model_type}' model{f' with {wrong}' if wrong else ''}; "
                f"the Q-Former starts from a BERT-architecture checkpoint with {_FIXED}"
            )
        updates = dict(
            hidden_size=bert.hidden_size,
            num_layers=bert.num_hidden_layers,
            num_heads=bert.num_attention_heads,
            intermediate_size=bert.intermediate_size,
        )
        if cfg.qformer_text:
            updates["vocab_size"] = bert.vocab_size
    if cfg.qformer_text and not (updates.get("vocab_size") or cfg.vocab_size):
        updates["vocab_size"] = len(load_qformer_tokenizer(cfg))
    return dataclasses.replace(cfg, **updates)


class QFormerConnector(Connector):
    """BLIP-2's Q-Former: features [I, N, Dv] → K = `num_queries` tokens [I, K, D_llm] (see the module docstring).

    K learned queries cross-attend to the frozen tower's features every `cross_attention_frequency` layers; a
    linear layer maps their outputs to the LLM width. Instruction-aware (InstructBLIP), `forward` also reads each
    image's instruction ids and mask [I, T] in the Q-Former's own tokenizer, so the queries pick what it asks for.
    """

    def __init__(self, cfg: ConnectorConfig, vision_dim: int, vision_tokens: int, llm_dim: int):
        super().__init__(cfg, vision_dim, vision_tokens, llm_dim)
        cfg = resolve_qformer_config(cfg)
        width = cfg.hidden_size or vision_dim
        if width % cfg.num_heads:
            raise ValueError(f"qformer width {width} is not divisible by num_heads {cfg.num_heads}")
        shape = dict(
            hidden_size=width,
            num_hidden_layers=cfg.num_layers,
            num_attention_heads=cfg.num_heads,
            intermediate_size=cfg.intermediate_size or 4 * width,
            encoder_hidden_size=vision_dim,
            cross_attention_frequency=cfg.cross_attention_frequency,
        )
        self.config = cfg
        """The connector config with every size explicit (what a checkpoint saves)."""
        self.num_tokens = cfg.num_queries
        self.text_aware = cfg.qformer_text
        self.instruction_aware = cfg.instruction_aware
        self.query_tokens = nn.Parameter(torch.randn(1, cfg.num_queries, width) * 0.02)
        if cfg.qformer_text:
            self.qformer = InstructBlipQFormerModel(
                InstructBlipQFormerConfig(vocab_size=cfg.vocab_size, pad_token_id=None, **shape)
            )
        else:
            self.qformer = Blip2QFormerModel(Blip2QFormerConfig(vocab_size=1, **shape))  # never embeds text
        # llm_dim 0: no LLM (stage-0 representation pretraining); the LLM projection is added by stage 1
        self.proj = nn.Linear(width, llm_dim) if llm_dim else nn.Identity()
        self.tokenizer = load_qformer_tokenizer(cfg) if cfg.qformer_text else None
        """The Q-Former's own tokenizer (text-aware form), for instructions and captions."""
        if cfg.qformer_init:
            load_bert_weights(self.qformer, cfg.qformer_init)

    def forward(
        self,
        features: torch.Tensor,
        text_ids: torch.Tensor | None = None,
        text_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:  # [I, N, Dv] (+ instruction [I, T]) → [I, K, Dl]
        if not self.instruction_aware:
            text_ids = text_mask = None  # the plain Q-Former never reads text
        elif text_ids is None:
            raise ValueError(
                "this Q-Former is instruction-aware: every image needs its instruction ids (qformer_input_ids)"
            )
        hidden = self.encode(features, text_ids, text_mask)  # [I, K(+T), W]
        return self.proj(hidden[:, : self.num_tokens])  # only the query outputs become visual tokens

    def encode(
        self,
        features: torch.Tensor,
        text_ids: torch.Tensor | None = None,
        text_mask: torch.Tensor | None = None,
        mask: str = "bidirectional",
    ) -> torch.Tensor:
        """Image features [I, N, Dv] and optional text ids/mask [I, T] → hidden states [I, K(+T), W], queries first.

        `mask` (one of `MASKS`) sets how queries and text see each other; text needs the text-aware form.
        """
        queries = self.query_tokens.expand(features.shape[0], -1, -1)  # [I, K, W]
        if not self.text_aware:
            if text_ids is not None:
                raise ValueError("the queries-only Q-Former has no text input; build it with qformer_text")
            return self.qformer(query_embeds=queries, encoder_hidden_states=features).last_hidden_state
        attention = None
        if text_ids is not None:
            text_mask = torch.ones_like(text_ids) if text_mask is None else text_mask
            attention = qformer_attention_mask(mask, self.num_tokens, text_mask, queries.dtype)
        return self.qformer(
            input_ids=text_ids,
            query_embeds=queries,
            attention_mask=attention,
            encoder_hidden_states=features,
        ).last_hidden_state


def qformer_attention_mask(kind: str, num_queries: int, text_mask: torch.Tensor, dtype: torch.dtype):
    """BLIP-2's mask `kind` over [K queries; T text tokens] → additive mask [B, 1, K+T, K+T] (0 = may attend).

    `text_mask` [B, T]: 1 for real text tokens, 0 for padding (never attended to).
    """
    if kind not in MASKS:
        raise ValueError(f"unknown Q-Former attention mask {kind!r}; known: {MASKS}")
    b, t = text_mask.shape
    k = num_queries
    real = torch.cat([text_mask.new_ones(b, k), text_mask], dim=1).bool()  # [B, K+T] keys that exist
    allowed = real[:, None, :].expand(b, k + t, k + t).clone()  # [B, K+T (who looks), K+T (at whom)]
    if kind in ("causal", "unimodal"):
        allowed[:, :k, k:] = False  # queries never see the text
    if kind == "unimodal":
        allowed[:, k:, :k] = False  # nor the text the queries
    if kind == "causal":
        allowed[:, k:, k:] &= torch.ones(t, t, dtype=torch.bool, device=text_mask.device).tril()
    additive = torch.zeros(allowed.shape, dtype=dtype, device=text_mask.device)
    return additive.masked_fill(~allowed, torch.finfo(dtype).min)[:, None]


_LAYER_FFN = re.compile(r"^encoder\.layer\.(\d+)\.(intermediate|output)\.(.*)$")


def bert_to_qformer(bert: dict[str, torch.Tensor], text: bool) -> dict[str, torch.Tensor]:
    """A BertModel state dict → the Q-Former's (text-aware: InstructBLIP's names; else BLIP-2's), no cross-attention.

    BERT adds token-type 0's embedding to every token; it is folded into the position table, so that text
    embeds exactly as in BERT. The query feed-forward starts as a copy of BERT's (as in BLIP-2).
    """
    out = {}
    norm = {"weight": bert["embeddings.LayerNorm.weight"], "bias": bert["embeddings.LayerNorm.bias"]}
    if text:
        out["embeddings.word_embeddings.weight"] = bert["embeddings.word_embeddings.weight"]
        out["embeddings.position_embeddings.weight"] = (
            bert["embeddings.position_embeddings.weight"] + bert["embeddings.token_type_embeddings.weight"][0]
        )
        out.update({f"embeddings.layernorm.{k}": v for k, v in norm.items()})
    else:
        out.update({f"layernorm.{k}": v for k, v in norm.items()})
    for key, value in bert.items():
        if not key.startswith("encoder.layer."):
            continue
        ffn = _LAYER_FFN.match(key)
        if ffn is None:
            out[key.replace(".attention.self.", ".attention.attention.")] = value
            continue
        layer, part, rest = ffn.groups()
        out[f"encoder.layer.{layer}.{part}_query.{rest}"] = value
        if text:
            out[key] = value
    return out


def load_bert_weights(qformer: nn.Module, path: str) -> None:
    """Copy a BERT checkpoint's weights into `qformer` (a fresh transformers Q-Former); cross-attention stays new."""
    bert = AutoModel.from_pretrained(path, dtype=torch.float32)
    mapped = bert_to_qformer(bert.state_dict(), text=isinstance(qformer, InstructBlipQFormerModel))
    missing, unexpected = qformer.load_state_dict(mapped, strict=False)
    not_cross = [k for k in missing if ".crossattention." not in k]
    if unexpected or not_cross:
        raise ValueError(
            f"--qformer-init {path}: its weights do not fit the Q-Former (unexpected {unexpected[:3]}, "
            f"missing {not_cross[:3]}); is it a BERT with the Q-Former's layer count and width?"
        )
    log.info("Q-Former initialised from %s (%d tensors; cross-attention new)", path, len(mapped))
