"""`MultimodalLM`: frozen vision tower → connector → visual tokens spliced into the LLM's embeddings → loss."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers.utils import ModelOutput

from mllm.config import IGNORE_INDEX, IMAGE_TOKEN_ID, ModelConfig
from mllm.connectors.base import Connector
from mllm.data.layout import ImageLayout, layout_for
from mllm.vision.base import VisionTower

LOSS_CHUNK = 2048
"""Default supervised positions per head + loss chunk (`MultimodalLM.loss_chunk_size`): bounds the logits kept
for backward to LOSS_CHUNK × vocabulary."""


@dataclass
class MultimodalOutput(ModelOutput):  # a ModelOutput so that DeepSpeed's ZeRO-3 hooks can walk it
    loss: torch.Tensor | None = None
    """Mean loss over supervised tokens of this batch."""
    loss_sum: torch.Tensor | None = None
    """Summed loss, for normalising by supervised tokens across accumulated micro-batches."""
    num_tokens: torch.Tensor | None = None
    """Supervised (predicted) tokens in this batch."""
    logits: torch.Tensor | None = None
    """Full-vocabulary logits [B, T, V], only when asked for (`return_logits=True`)."""


class MultimodalLM(nn.Module):
    """A LLaVA / BLIP-2-style model: image → `vision` tower → `connector` → spliced into the `llm`'s embeddings.

    Each image becomes K = `num_image_tokens` embeddings that take the places of the K IMAGE_TOKEN_ID positions
    the data layer put in `input_ids` for its `<image>` placeholder; the LLM then runs on text and images alike.
    What trains (connector only, LoRA, full LLM, tower) is set by `config` and `mllm.model.apply_trainability`;
    the model knows nothing of distribution (DeepSpeed wraps it from outside).
    """

    def __init__(self, config: ModelConfig, vision: VisionTower, connector: Connector, llm: nn.Module):
        super().__init__()
        self.config = config
        self.vision = vision
        self.connector = connector
        self.llm = llm
        self.loss_chunk_size: int | None = LOSS_CHUNK
        """Supervised positions per head + loss chunk in `supervised_loss` (None = all at once); training sets it
        from its run config, evaluation and benchmarks use the default: one loss path for all."""
        mean = getattr(getattr(vision, "processor", None), "image_mean", None) or [0.0, 0.0, 0.0]
        self.image_layout: ImageLayout = layout_for(
            config.vision,
            vision.image_size,
            connector.num_tokens,
            fill=tuple(int(round(255 * m)) for m in mean),
        )
        """How each image becomes tiles and visual tokens (`mllm.data.layout`); data, eval and chat all use it."""

    @property
    def num_image_tokens(self) -> int:
        """Visual tokens of one tower tile (= of each image with `image_aspect` square or pad)."""
        return self.connector.num_tokens

    def encode_images(
        self,
        pixel_values: torch.Tensor | None,
        features: torch.Tensor | None = None,
        qformer_input_ids: torch.Tensor | None = None,
        qformer_attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Tiles [T, 3, H, W] (or their precomputed tower features [T, N, Dv]) → visual tokens [T, K, D_llm].

        One batched tower forward over every tile of every image; `arrange_images` then orders each image's tokens.

        An instruction-aware Q-Former also reads each image's instruction: `qformer_input_ids` / `_attention_mask`
        [I, T], in its own tokenizer's ids; other connectors never see them.
        """
        train_vision = self.config.vision.trainable == "full"
        if features is None:
            with torch.set_grad_enabled(train_vision and torch.is_grad_enabled()):
                features = self.vision(pixel_values)  # [I, N, Dv]
        elif train_vision:
            raise ValueError(
                "precomputed vision features cannot train the vision tower (vision.trainable=full)"
            )
        cdtype = next(self.connector.parameters()).dtype
        if self.connector.instruction_aware:
            return self.connector(features.to(cdtype), qformer_input_ids, qformer_attention_mask)
        return self.connector(features.to(cdtype))  # [I, K, D_llm]

    def embed(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        image_counts: torch.Tensor | None = None,
        sample_ids: list | None = None,
        features: torch.Tensor | None = None,
        qformer_input_ids: torch.Tensor | None = None,
        qformer_attention_mask: torch.Tensor | None = None,
        image_sizes: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Token ids [B, T] (image positions = IMAGE_TOKEN_ID) → input embeddings [B, T, D].

        `pixel_values` [T, 3, H, W]: every tile of every image, image by image, in row-major token order;
        `image_sizes` [I, 2]: the (width, height) each image was used at (needed when an image has several tiles);
        `image_counts` [B]: images per row. `features` [T, N, Dv] (e.g. from `mllm.data.features`) replace
        `pixel_values` for a frozen tower. `qformer_input_ids` / `qformer_attention_mask` [I, L]: each image's
        instruction (see `encode_images`).
        """
        is_image = input_ids == IMAGE_TOKEN_ID  # [B, T]
        text_ids = input_ids.masked_fill(is_image, 0)
        embeds = self.llm.get_input_embeddings()(text_ids)  # [B, T, D]
        tiles = features if features is not None else pixel_values
        n_tiles = 0 if tiles is None else tiles.shape[0]
        sizes = self._image_sizes(image_sizes, n_tiles)
        self._check_image_positions(is_image, sizes, image_counts, sample_ids)
        if n_tiles == 0:
            return embeds
        visual = self.encode_images(pixel_values, features, qformer_input_ids, qformer_attention_mask)
        visual = self.arrange_images(visual.to(embeds.dtype), sizes)  # [sum of k_i, D]
        return embeds.masked_scatter(is_image.unsqueeze(-1), visual)  # row-major: image i fills its k_i slots

    def arrange_images(self, tiles: torch.Tensor, sizes: list[tuple[int, int]]) -> torch.Tensor:
        """Connector output of every tile [T, K, D] → every image's visual tokens, one after another [sum k_i, D]."""
        layout = self.image_layout
        if all(layout.num_tiles(s) == 1 for s in sizes) and layout.aspect != "anyres":
            return tiles.flatten(0, 1)  # one tile per image, its K tokens as they come
        per_image = tiles.split([layout.num_tiles(s) for s in sizes])
        newline = getattr(self.connector, "image_newline", None)
        return torch.cat([layout.arrange(t, s, newline) for t, s in zip(per_image, sizes, strict=True)])

    def _image_sizes(self, image_sizes: torch.Tensor | None, n_tiles: int) -> list[tuple[int, int]]:
        """The (width, height) of each image in the batch; without `image_sizes`, every tile is an image."""
        layout = self.image_layout
        if image_sizes is None:
            if layout.aspect == "anyres" and n_tiles:
                raise ValueError(
                    "image_aspect anyres: the batch needs image_sizes to arrange each image's tiles"
                )
            return [(layout.tile_size, layout.tile_size)] * n_tiles
        sizes = [(int(w), int(h)) for w, h in image_sizes.tolist()]
        tiles = sum(layout.num_tiles(s) for s in sizes)
        if tiles != n_tiles:
            raise ValueError(
                f"batch has {n_tiles} image tile(s) but its {len(sizes)} image size(s) call for {tiles} under "
                f"image_aspect={layout.aspect}; the pixels were not made by this model's image layout"
            )
        return sizes

    def _check_image_positions(self, is_image, sizes, image_counts, sample_ids) -> None:
        counts = [self.image_layout.num_tokens(s) for s in sizes]
        per_row = is_image.sum(dim=1).tolist()
        if image_counts is not None:
            start = 0
            for b, n in enumerate(image_counts.tolist()):
                expected = sum(counts[start : start + n])
                if per_row[b] != expected:
                    who = sample_ids[b] if sample_ids is not None else f"batch row {b}"
                    raise ValueError(
                        f"sample {who}: {per_row[b]} image-token positions but its {n} image(s) need "
                        f"{counts[start : start + n]} = {expected}; each <image> placeholder needs exactly one "
                        "image, encoded with the model's image layout"
                    )
                start += n
        if sum(per_row) != sum(counts):
            raise ValueError(
                f"batch has {sum(per_row)} image-token positions but its {len(counts)} image(s) need "
                f"{sum(counts)}; each <image> placeholder needs exactly one image"
            )

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_counts: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        sample_ids: list | None = None,
        return_logits: bool = False,
        features: torch.Tensor | None = None,
        loss_chunk_size: int | None = None,
        qformer_input_ids: torch.Tensor | None = None,
        qformer_attention_mask: torch.Tensor | None = None,
        image_sizes: torch.Tensor | None = None,
        **llm_kwargs,
    ) -> MultimodalOutput:
        """A batch of token rows with their images → the loss over supervised tokens (and logits on request).

        In: `input_ids` [B, T] (each image's visual-token ids), `attention_mask` [B, T] (1 = real token) for padded
        rows or `position_ids` [B, T] (restarting at 0 per sample) for packed ones, `labels` [B, T] (IGNORE_INDEX
        where nothing is learnt), `pixel_values` [T, 3, H, W] for the batch's tiles (one per image unless anyres) in
        row order (or `features` [T, N, Dv], a frozen tower's cached output), `image_sizes` [I, 2] (anyres),
        `image_counts` [B] images per row and `sample_ids` (to name a bad sample).
        Out: `MultimodalOutput` with `loss` (mean), `loss_sum` and `num_tokens` (so that gradient accumulation
        divides by all supervised tokens of a step, not by micro-batches), and `logits` [B, T, V] if
        `return_logits` (kept off in training: the loss is chunked instead, `loss_chunk_size`).
        """
        embeds = self.embed(
            input_ids,
            pixel_values,
            image_counts,
            sample_ids,
            features,
            qformer_input_ids,
            qformer_attention_mask,
            image_sizes,
        )  # [B, T, D]
        hidden = self.llm.get_decoder()(
            inputs_embeds=embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=False,
            **llm_kwargs,
        ).last_hidden_state  # [B, T, D]
        logits = self.head(hidden) if return_logits else None  # [B, T, V]
        if labels is None:
            return MultimodalOutput(logits=logits)
        chunk = loss_chunk_size if loss_chunk_size is not None else self.loss_chunk_size
        loss_sum, n = self.supervised_loss(hidden, labels, chunk)
        return MultimodalOutput(
            loss=loss_sum / n.clamp(min=1), loss_sum=loss_sum, num_tokens=n, logits=logits
        )

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Hidden states → full-vocabulary logits (with the LLM's final soft-capping, if it has one)."""
        logits = self.llm.get_output_embeddings()(hidden)
        cap = getattr(self.llm.config, "final_logit_softcapping", None)
        return torch.tanh(logits / cap) * cap if cap else logits

    def supervised_loss(
        self, hidden: torch.Tensor, labels: torch.Tensor, chunk_size: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Next-token loss summed over supervised positions only: prompt and image tokens never reach the head.

        With `chunk_size`, the head and loss run over at most that many positions at a time and each chunk's
        logits are recomputed in backward instead of kept: peak memory of M×V logits drops to chunk_size×V.
        """
        targets = labels[:, 1:]  # [B, T-1]
        keep = targets != IGNORE_INDEX
        h = hidden[:, :-1][keep]  # [M, D]
        t = targets[keep]  # [M]
        if chunk_size is None or h.shape[0] <= chunk_size:
            return self._head_loss_sum(h, t), keep.sum()

        parts = [
            checkpoint(self._head_loss_sum, hc, tc, use_reentrant=False)
            for hc, tc in zip(h.split(chunk_size), t.split(chunk_size), strict=True)
        ]
        return torch.stack(parts).sum(), keep.sum()

    def _head_loss_sum(self, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = self.head(h).float()  # [M, V]
        return nn.functional.cross_entropy(logits, targets, reduction="sum")
