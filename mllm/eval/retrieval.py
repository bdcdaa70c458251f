"""`mllm eval --task retrieval`: what a pretrained Q-Former (stage 0) aligned, measured without an LLM.

Over a caption set (each item: one image and its caption), the distinct captions are the texts:

- image→text recall@k: the image's own caption is among its k most similar texts (ITC similarity, the best of
  the queries); text→image recall@k: one of the caption's images is among its k most similar images;
- zero-shot classification: each image takes the most similar of the distinct captions (= image→text R@1; on a
  caption set of class descriptions, e.g. easy-VQA's 24 colour × shape captions, this is classification);
- ITM accuracy: the ITM head's match / no-match decision on every image with its own caption and with one other
  caption drawn at random (seeded), half matched, half mismatched.
"""

from __future__ import annotations

import random

import torch
from tqdm import tqdm

from mllm.eval.data import EvalItem

RECALL_AT = (1, 5)


@torch.no_grad()
def retrieval_scores(
    model, items: list[EvalItem], batch_size: int = 32, seed: int = 0, progress: bool = True
) -> dict:
    """A `QFormerPretrainer` and caption items (one image each) → the scores above (percentages) and counts."""
    from mllm.data.images import open_image
    from mllm.data.instruction import encode_instructions

    bad = [it.id for it in items if len(it.images) != 1]
    if bad:
        raise ValueError(
            f"retrieval needs one image per caption; samples {bad[:5]} have {len(items[0].images)}"
        )
    texts = list(dict.fromkeys(it.reference for it in items))
    truth = torch.tensor([texts.index(it.reference) for it in items])  # [N] index of each image's caption
    device = model.connector.query_tokens.device
    ids, mask = encode_instructions(
        model.connector.tokenizer, texts, max_tokens=128
    )  # [C, T] "[CLS] … [SEP]"
    ids, mask = ids.to(device), mask.to(device)
    text = torch.cat(
        [
            model.text_embeds(ids[i : i + batch_size], mask[i : i + batch_size])
            for i in range(0, len(texts), batch_size)
        ]
    )
    features, images = [], []
    for start in tqdm(range(0, len(items), batch_size), desc="images", unit="batch", disable=not progress):
        chunk = items[start : start + batch_size]
        pixels = model.vision.preprocess(
            [open_image(it.images[0], it.image_root, it.max_image_pixels) for it in chunk]
        )
        feats = model.image_features(pixels.to(device), None)  # [b, N, Dv]
        features.append(feats.cpu())
        images.append(model.image_embeds(feats))  # [b, K, E]
    img = torch.cat(images)  # [N, K, E]
    sim = torch.einsum("nke,ce->nck", img, text).amax(-1).cpu()  # [N, C]
    scores = {"n_images": len(items), "n_texts": len(texts)}
    for k in RECALL_AT:
        scores[f"i2t_r@{k}"], scores[f"t2i_r@{k}"] = recall_at(sim, truth, k)
    scores["zero_shot_accuracy"] = scores["i2t_r@1"]
    scores["itm_accuracy"] = itm_accuracy(model, torch.cat(features), truth, ids, mask, batch_size, seed)
    return scores


def recall_at(sim: torch.Tensor, truth: torch.Tensor, k: int) -> tuple[float, float]:
    """Similarities [N images, C texts] and each image's text [N] → (image→text, text→image) recall@k in %.

    A text is found when any image of it is among its k nearest (a caption set may repeat a caption)."""
    top_texts = sim.topk(min(k, sim.shape[1]), dim=1).indices  # [N, k]
    i2t = (top_texts == truth[:, None]).any(1).float().mean().item()
    top_images = sim.topk(min(k, sim.shape[0]), dim=0).indices  # [k, C]
    t2i = (truth[top_images] == torch.arange(sim.shape[1])).any(0).float().mean().item()
    return 100.0 * i2t, 100.0 * t2i


def itm_accuracy(model, features, truth, ids, mask, batch_size: int, seed: int) -> float | None:
    """Percentage of right match / no-match decisions over each image with its caption and with another one."""
    if ids.shape[0] < 2:
        return None  # one caption: nothing to mismatch
    rng = random.Random(seed)
    others = [rng.choice([c for c in range(ids.shape[0]) if c != t]) for t in truth.tolist()]
    pairs = [(i, t, 1) for i, t in enumerate(truth.tolist())] + [(i, c, 0) for i, c in enumerate(others)]
    right = 0
    device = ids.device
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        rows = torch.tensor([p[0] for p in chunk])
        caps = torch.tensor([p[1] for p in chunk], device=device)
        logits = model.itm_logits(features[rows].to(device), ids[caps], mask[caps])  # [b, 2]
        right += int((logits.argmax(-1).cpu() == torch.tensor([p[2] for p in chunk])).sum())
    return 100.0 * right / len(pairs)


def format_retrieval(scores: dict) -> str:
    lines = [f"retrieval over {scores['n_images']} images and {scores['n_texts']} distinct captions"]
    lines += [
        f"  image→text R@{k}: {scores[f'i2t_r@{k}']:.1f}%   text→image R@{k}: {scores[f't2i_r@{k}']:.1f}%"
        for k in RECALL_AT
    ]
    lines.append(f"  zero-shot classification (closest caption): {scores['zero_shot_accuracy']:.1f}%")
    if scores["itm_accuracy"] is not None:
        lines.append(f"  ITM accuracy (matched vs mismatched pairs): {scores['itm_accuracy']:.1f}%")
    return "\n".join(lines)
