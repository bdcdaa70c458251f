"""BLIP-2 stage-0 model: the text-aware Q-Former learns image representations against the frozen tower alone.

No LLM is loaded. Three objectives share the Q-Former (the BLIP-2 paper, §3.2; LAVIS `blip2_qformer.py`):

- ITC, image-text contrastive: query outputs (unimodal mask: queries and text never see each other) and the
  text's [CLS] output are projected to a small space; an image's similarity to a text is the best of its
  queries'. In-batch negatives come from every process (`gather_rows`, which training sets to
  `mllm.train.distributed.all_gather_rows`; this module knows nothing of distribution).
- ITM, image-text matching: [queries; text] under the bidirectional mask, a 2-way head on the mean query output;
  positives and, per image and per text, one hard negative drawn from the ITC similarities.
- ITG, image-grounded text generation: [queries; text] under the multimodal causal mask, an LM head on the text
  positions (BERT's prediction-head shape, decoder tied to the word embeddings).

Captions that are the same text are the same class: they are positives of each other in ITC and never drawn as
each other's ITM negatives (a caption set like easy-VQA's has 24 distinct captions among thousands of images).

A batch is `mllm train`'s caption micro-batch, tokenised by the Q-Former's own tokenizer (`caption_tokenizer`):
`input_ids` = "[CLS] caption [SEP]", right-padded; one image per row.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers.utils import ModelOutput

from mllm.config import ModelConfig
from mllm.connectors.qformer import QFormerConnector
from mllm.data.layout import ImageLayout

log = logging.getLogger(__name__)

HEADS_FILE = "qformer_heads.safetensors"
"""In a stage-0 checkpoint: the pretraining heads (ITC projections, temperature, ITM head, LM head)."""

OBJECTIVES = ("itc", "itm", "itg")

EMBED_DIM = 256
"""Width of the ITC space (BLIP-2's)."""


def single_process_rows(local: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The `gather_rows` of one process: its own rows, starting at 0."""
    return local, 0


@dataclass
class PretrainOutput(ModelOutput):  # a ModelOutput so that DeepSpeed's ZeRO-3 hooks can walk it
    loss: torch.Tensor | None = None
    """ITC + ITM + ITG, each the mean over this micro-batch (ITC: over the micro-batches of all processes)."""
    loss_sum: torch.Tensor | None = None
    """`loss` × rows: `mllm train` normalises stage 0 by the samples of the whole accumulated step."""
    parts: dict[str, torch.Tensor] | None = None
    """Each objective's mean × rows (their sum is `loss_sum`; logged separately)."""


class PretrainHeads(nn.Module):
    """What BLIP-2 stage 1 trains beside the Q-Former: ITC projections and temperature, ITM head, LM head."""

    def __init__(self, width: int, vocab_size: int, embed_dim: int = EMBED_DIM):
        super().__init__()
        self.vision_proj = nn.Linear(width, embed_dim)
        self.text_proj = nn.Linear(width, embed_dim)
        self.temp = nn.Parameter(torch.full((1,), 0.07))  # 1-d: DeepSpeed broadcasts parameters as bytes
        self.itm_head = nn.Linear(width, 2)
        self.lm_transform = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.LayerNorm(width, eps=1e-12))
        self.lm_bias = nn.Parameter(torch.zeros(vocab_size))

    def temperature(self) -> torch.Tensor:
        return self.temp.clamp(0.001, 0.5)


class QFormerPretrainer(nn.Module):
    """Frozen vision tower + text-aware Q-Former + `PretrainHeads`; `forward` returns the three losses."""

    def __init__(
        self, config: ModelConfig, vision: nn.Module, connector: QFormerConnector, heads: PretrainHeads
    ):
        super().__init__()
        self.config = config
        self.vision = vision
        self.connector = connector
        self.heads = heads
        self.gather_rows = single_process_rows
        """rows [R, ...] → (all processes' rows, where this one's start); training sets the distributed one."""
        self.pad_id = connector.tokenizer.pad_token_id
        self.image_layout = ImageLayout.fixed(0)
        """One square tile per image and no visual tokens in the text: captions are the Q-Former's own input."""

    @property
    def num_image_tokens(self) -> int:
        return 0  # captions are the Q-Former's text; nothing is spliced into a sequence

    @property
    def width(self) -> int:
        return self.connector.query_tokens.shape[-1]

    def image_features(
        self, pixel_values: torch.Tensor | None, features: torch.Tensor | None
    ) -> torch.Tensor:
        """Images [B, 3, H, W] (or cached tower features [B, N, Dv]) → tower features [B, N, Dv] (connector dtype)."""
        if features is None:
            with torch.set_grad_enabled(self.config.vision.trainable == "full" and torch.is_grad_enabled()):
                features = self.vision(pixel_values)
        return features.to(self.connector.query_tokens.dtype)

    def image_embeds(self, features: torch.Tensor) -> torch.Tensor:
        """Tower features [B, N, Dv] → normalised ITC embeddings of the queries [B, K, E]."""
        queries = self.connector.encode(features)[:, : self.connector.num_tokens]
        return F.normalize(self.heads.vision_proj(queries), dim=-1)

    def text_embeds(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Caption ids/mask [B, T] → normalised ITC embeddings of their [CLS] [B, E] (text alone: no image)."""
        width = self.connector.qformer.config.encoder_hidden_size
        no_image = self.connector.query_tokens.new_zeros(ids.shape[0], 1, width)  # the text never sees it
        hidden = self.connector.encode(no_image, ids, mask, mask="unimodal")
        return F.normalize(self.heads.text_proj(hidden[:, self.connector.num_tokens]), dim=-1)

    def itm_logits(self, features: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Pairs of tower features [P, N, Dv] and caption ids/mask [P, T] → match logits [P, 2] (1 = match)."""
        hidden = self.connector.encode(features, ids, mask, mask="bidirectional")
        return self.heads.itm_head(hidden[:, : self.connector.num_tokens]).mean(1)

    def forward(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        features: torch.Tensor | None = None,
        image_counts: torch.Tensor | None = None,
        sample_ids: list | None = None,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,  # padding is read from the ids (the pad id is never text)
        labels: torch.Tensor | None = None,  # the captions are the targets
        image_sizes: torch.Tensor | None = None,  # one square tile per image: sizes change nothing
    ) -> PretrainOutput:
        check_caption_batch(input_ids, image_counts, position_ids, sample_ids)
        feats = self.image_features(pixel_values, features)  # [B, N, Dv]
        mask = (input_ids != self.pad_id).long()  # [B, T]
        k = self.connector.num_tokens
        # ITC: queries and text in one pass, blind to each other
        hidden = self.connector.encode(feats, input_ids, mask, mask="unimodal")  # [B, K+T, W]
        img = F.normalize(self.heads.vision_proj(hidden[:, :k]), dim=-1)  # [B, K, E]
        txt = F.normalize(self.heads.text_proj(hidden[:, k]), dim=-1)  # [B, E]
        keys = caption_keys(input_ids, mask)  # [B] same caption text ↔ same key
        img_all, start = self.gather_rows(img)  # [B_all, K, E]
        txt_all, _ = self.gather_rows(txt)  # [B_all, E]
        keys_all, _ = self.gather_rows(keys)  # [B_all]
        # ITC over every process's rows and columns (as open_clip does): this process's embeddings carry the
        # gradient of every term they enter, also as another process's negatives, so that the gradients summed
        # over processes are exactly those of the whole batch on one process
        sim = (
            torch.einsum("ike,je->ijk", img_all, txt_all).amax(-1) / self.heads.temperature()
        )  # [B_all, B_all]
        positive = keys_all[:, None] == keys_all[None]  # [B_all, B_all]
        itc = (soft_cross_entropy(sim, positive) + soft_cross_entropy(sim.T, positive)) / 2
        b, b_all = input_ids.shape[0], keys_all.shape[0]
        itc_sum = (
            b_all * itc - (b_all - b) * itc.detach()
        )  # value: this process's b rows; gradient: all rows'
        # ITM: positives, and hard negatives drawn from this process's ITC similarities
        local = slice(start, start + b)
        same = positive[local, local]  # [B, B]
        neg_text = hard_negatives(sim[local, local], same)  # [B] (-1: none)
        neg_image = hard_negatives(sim[local, local].T, same)
        rows = torch.arange(b, device=input_ids.device)
        has_t, has_i = neg_text >= 0, neg_image >= 0
        image_rows = torch.cat([rows, rows[has_t], neg_image[has_i]])
        text_rows = torch.cat([rows, neg_text[has_t], rows[has_i]])
        match = torch.cat([torch.ones(b), torch.zeros(int(has_t.sum()) + int(has_i.sum()))]).long()
        logits = self.itm_logits(feats[image_rows], input_ids[text_rows], mask[text_rows])  # [P, 2]
        itm = F.cross_entropy(logits, match.to(logits.device))
        # ITG: the caption, token by token, from the queries (multimodal causal mask)
        hidden = self.connector.encode(feats, input_ids, mask, mask="causal")  # [B, K+T, W]
        itg = self.caption_loss(hidden[:, k:-1], input_ids[:, 1:], mask[:, 1:])
        parts = {"itc": itc_sum, "itm": itm * b, "itg": itg * b}
        loss_sum = itc_sum + parts["itm"] + parts["itg"]
        return PretrainOutput(loss=loss_sum / b, loss_sum=loss_sum, parts=parts)

    def caption_loss(self, hidden: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Text hidden states [B, T-1, W] → mean cross-entropy of the next tokens `targets` where `mask` is 1."""
        words = self.connector.qformer.embeddings.word_embeddings.weight  # the LM decoder is tied to them
        keep = mask.bool()
        logits = F.linear(self.heads.lm_transform(hidden[keep]), words, self.heads.lm_bias)  # [n, V]
        return F.cross_entropy(logits, targets[keep])


def check_caption_batch(input_ids, image_counts, position_ids, sample_ids) -> None:
    """Stage 0 reads one image and one caption per row: refuse anything else by sample id."""
    if position_ids is not None:
        raise ValueError("stage 0 cannot train on packed rows (one caption per row): use --packing off")
    if image_counts is None or image_counts.shape[0] != input_ids.shape[0] or bool((image_counts != 1).any()):
        counts = [] if image_counts is None else image_counts.tolist()
        bad = [sid for sid, n in zip(sample_ids or [], counts, strict=False) if n != 1]
        raise ValueError(
            f"stage 0 (Q-Former pretraining) needs exactly one image per caption; samples {bad[:5] or '?'} have "
            f"{counts[:5]}: give it caption data (one <image> and one answer per sample)"
        )


def caption_keys(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """One int64 per row, equal for rows holding the same token ids (a polynomial hash, wrapping on overflow)."""
    powers = torch.full((ids.shape[1],), 1_000_003, dtype=torch.long, device=ids.device).cumprod(0)
    return ((ids * mask) * powers).sum(1) + mask.sum(1)


def soft_cross_entropy(logits: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of rows of `logits` against the uniform distribution over their `positive` entries."""
    target = positive.float() / positive.float().sum(1, keepdim=True)
    return -(target * F.log_softmax(logits, dim=1)).sum(1).mean()


@torch.no_grad()
def hard_negatives(sim: torch.Tensor, same: torch.Tensor) -> torch.Tensor:
    """Per row of similarities [B, B], a column drawn with probability softmax(sim) among the columns that are not
    the same caption; -1 where there is none."""
    weights = F.softmax(sim.float(), dim=1).masked_fill(same, 0.0)
    none = weights.sum(1) <= 0
    weights[none] = 1.0  # drawn, then discarded
    picked = torch.multinomial(weights, 1).squeeze(1)
    return picked.masked_fill(none, -1)


def caption_tokenizer(connector: QFormerConnector):
    """The Q-Former's tokenizer, rendering a caption sample as "[CLS] caption [SEP]" (its bos / eos)."""
    tok = connector.tokenizer
    if tok.cls_token is None or tok.sep_token is None or tok.pad_token_id is None:
        raise ValueError(
            f"stage 0 needs a BERT-style Q-Former tokenizer with [CLS], [SEP] and [PAD]; {type(tok).__name__} "
            "lacks one (give --qformer-init a BERT checkpoint)"
        )
    tok = copy.deepcopy(tok)
    tok.bos_token, tok.eos_token = tok.cls_token, tok.sep_token
    return tok


def build_qformer_pretrainer(cfg: ModelConfig, runtime=None, trainable: bool = True) -> QFormerPretrainer:
    """The stage-0 model of `cfg` (a text-aware Q-Former, no LLM): tower loaded, Q-Former and heads fp32."""
    from mllm.model.runtime import resolve_runtime
    from mllm.vision import build_vision_tower

    if cfg.connector.kind != "qformer" or not cfg.connector.qformer_text:
        raise ValueError(
            "stage 0 pretrains the text-aware Q-Former: use --connector qformer --qformer-text (and --qformer-init "
            "a BERT checkpoint)"
        )
    runtime = runtime or resolve_runtime(cfg.dtype, cfg.attn_implementation)
    vision = build_vision_tower(cfg.vision, dtype=runtime.dtype, trust_remote_code=cfg.llm.trust_remote_code)
    connector = QFormerConnector(cfg.connector, vision.hidden_size, vision.num_tokens, llm_dim=0).float()
    cfg = dataclasses.replace(cfg, connector=connector.config)
    heads = PretrainHeads(connector.query_tokens.shape[-1], connector.config.vocab_size)
    model = QFormerPretrainer(cfg, vision, connector, heads)
    model.requires_grad_(False)
    if trainable:
        connector.requires_grad_(True)
        heads.requires_grad_(True)
        vision.requires_grad_(cfg.vision.trainable == "full")
    return model


def load_qformer_pretrainer(path: str, device: str | None = None, verify_hashes: bool = True):
    """A stage-0 checkpoint (or an output directory: its newest) → (`QFormerPretrainer` in eval mode, its config)."""
    from mllm.checkpoint import QFORMER_TOKENIZER_DIR, CheckpointError, read_config, read_weights, verify
    from mllm.model.runtime import resolve_runtime

    config = read_config(path)
    d = Path(config["_path"])
    if config.get("stage") != 0 or not (d / HEADS_FILE).is_file():
        raise CheckpointError(
            f"{d}: not a Q-Former pretraining checkpoint (mllm train --stage 0); retrieval needs its ITC/ITM heads"
        )
    files = ["connector.safetensors", HEADS_FILE]
    if verify_hashes:
        verify(d, hashed=files)
    mcfg = ModelConfig.from_dict(config["model"])
    mcfg.connector.qformer_init = ""
    mcfg.connector.qformer_tokenizer = str(d / QFORMER_TOKENIZER_DIR)
    runtime = resolve_runtime(mcfg.dtype, mcfg.attn_implementation, device)
    model = build_qformer_pretrainer(mcfg, runtime, trainable=False)
    model.connector.load_state_dict(read_weights(d / "connector.safetensors"))
    model.heads.load_state_dict(read_weights(d / HEADS_FILE))
    return model.to(runtime.device).eval(), config
