"""`mllm eval --task alignment`: the Modality Integration Rate (MIR) of a checkpoint, any connector.

MIR (Huang et al., "Deciphering Cross-Modal Alignment in Large Vision-Language Models with Modality Integration
Rate", 2024; reference code shikiw/Modality-Integration-Rate) measures how far the LLM's hidden states of visual
tokens lie from those of text tokens, layer by layer; lower = the visual tokens are more text-like to the LLM.
Ours, written from the paper and that code:

- each item (an image and its caption / answer) is run through the model as prompt + answer; per decoder layer
  (the embedding output excluded), the visual tokens' hidden states and the text tokens after the image;
- text-centric normalisation: both sets scaled by 1 / (mean L2 norm of that layer's text tokens);
- 3-sigma outliers (a token whose norm is more than 3 standard deviations from its set's mean) replaced by the
  set's median token;
- the Fréchet distance between the two sets' Gaussians, ||μv − μt||² + tr Σv + tr Σt − 2 tr (Σv Σt)^½;
- MIR = log10 of the sum over layers.
"""

from __future__ import annotations

import math

import torch
from tqdm import tqdm

from mllm.config import IMAGE_TOKEN_ID
from mllm.eval.data import EvalItem


@torch.no_grad()
def alignment_scores(
    model, processor, items: list[EvalItem], batch_size: int = 16, progress: bool = True
) -> dict:
    """A `MultimodalLM` + its processor and items with images → {"mir", "per_layer", "n_visual", "n_text"}."""
    from mllm.data.images import open_image
    from mllm.inference.generate import batched
    from mllm.inference.processor import Conversation

    visual: list[list[torch.Tensor]] = []
    text: list[list[torch.Tensor]] = []
    device = next(model.connector.parameters()).device
    for chunk in tqdm(list(batched(items, batch_size)), desc="alignment", unit="batch", disable=not progress):
        convs = []
        for it in chunk:
            images = [open_image(ref, it.image_root, it.max_image_pixels) for ref in it.images]
            convs.append(Conversation([*it.messages, {"role": "assistant", "content": it.reference}], images))
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in processor(convs).items()}
        ids = batch["input_ids"]  # [B, T]
        is_image = ids == IMAGE_TOKEN_ID
        after_image = is_image.long().cumsum(1) > 0
        is_text = after_image & ~is_image & batch["attention_mask"].bool()  # text after the (first) image
        embeds = model.embed(ids, batch["pixel_values"], batch["image_counts"])
        hidden = model.llm.get_decoder()(
            inputs_embeds=embeds,
            attention_mask=batch["attention_mask"],
            output_hidden_states=True,
            use_cache=False,
        ).hidden_states[1:]  # per decoder layer [B, T, D]
        visual.append([h[is_image].float().cpu() for h in hidden])
        text.append([h[is_text].float().cpu() for h in hidden])
    per_layer = []
    for layer in range(len(visual[0])):
        v = torch.cat([b[layer] for b in visual])
        t = torch.cat([b[layer] for b in text])
        scale = 1.0 / t.norm(dim=-1).mean()
        per_layer.append(frechet_distance(replace_outliers(v * scale), replace_outliers(t * scale)))
    return {
        "mir": math.log10(sum(per_layer)),
        "per_layer": per_layer,
        "n_visual": int(sum(b[0].shape[0] for b in visual)),
        "n_text": int(sum(b[0].shape[0] for b in text)),
    }


class AlignmentProbe:
    """MIR of a model while it trains (`mllm train --mir-data`): fixed items, scored by `alignment_scores`.

    `items`: `EvalItem`s, each with an image; `meta`: the run's template settings (`template`, `system_prompt`,
    `max_length`), so the items are encoded as the training samples are. `measure(model)` switches the model to
    eval mode for the measurement (no dropout) and back. Under ZeRO-3 every rank must call it, together.
    """

    def __init__(self, items: list[EvalItem], meta: dict, batch_size: int = 16):
        missing = [it.id for it in items if not it.images]
        if missing:
            raise ValueError(f"--mir-data needs an image in every sample; these have none: {missing[:5]}")
        self.items, self.meta, self.batch_size = items, meta, batch_size
        self._processor = None

    def measure(self, model) -> dict:
        from mllm.inference.processor import Processor

        if self._processor is None:
            self._processor = Processor.from_checkpoint(model, self.meta)
        was_training = model.training
        model.eval()
        try:
            return alignment_scores(model, self._processor, self.items, self.batch_size, progress=False)
        finally:
            model.train(was_training)


def replace_outliers(x: torch.Tensor) -> torch.Tensor:
    """Rows [N, D] whose L2 norm lies over 3 standard deviations from the mean norm → the median row."""
    norms = x.norm(dim=-1)
    out = (norms - norms.mean()).abs() > 3 * norms.std()
    x = x.clone()
    x[out] = x.median(dim=0).values
    return x


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to rows of `a` [N, D] and `b` [M, D] (float64)."""
    a, b = a.double(), b.double()
    mu = (a.mean(0) - b.mean(0)).square().sum()
    ca, cb = torch.cov(a.T), torch.cov(b.T)
    # tr (ca cb)^½ = Σ sqrt(eigenvalues of ca cb): real and non-negative for covariances (up to round-off)
    root = torch.linalg.eigvals(ca @ cb).real.clamp(min=0).sqrt().sum()
    return float(mu + ca.trace() + cb.trace() - 2 * root)


def format_alignment(scores: dict) -> str:
    layers = " ".join(f"{d:.2f}" for d in scores["per_layer"])
    return (
        f"Modality Integration Rate (MIR, lower = visual tokens closer to text): {scores['mir']:.3f}\n"
        f"  over {scores['n_visual']} visual and {scores['n_text']} text tokens; per-layer distance: {layers}"
    )
