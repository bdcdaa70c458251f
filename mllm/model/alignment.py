"""The Modality Integration Rate (MIR) of a model on batches of image + text: the measurement itself.

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

Who builds the batches: `mllm eval --task alignment` (the inference processor, `mllm.eval.alignment`) and
`mllm train --mir-data` (the training data pipeline, `mllm.train.alignment`); both give `input_ids`,
`attention_mask`, `pixel_values` and `image_counts` of whole conversations (prompt + answer), right-padded.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from mllm.config import IMAGE_TOKEN_ID


@torch.no_grad()
def modality_integration_rate(model, batches: Iterable[dict]) -> dict:
    """A `MultimodalLM` and batches (tensors on its device) → {"mir", "per_layer", "n_visual", "n_text"}."""
    visual: list[list[torch.Tensor]] = []
    text: list[list[torch.Tensor]] = []
    for batch in batches:
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
