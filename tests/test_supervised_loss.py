"""The loss at supervised positions only equals the standard full-vocabulary computation, in value and gradients."""

from __future__ import annotations

import functools

import torch
from torch import nn

from mllm.config import IMAGE_TOKEN_ID
from mllm.data import IGNORE_INDEX
from mllm.model import build_model


def supervised_loss(model, batch: dict, chunk_size: int | None = 2048) -> torch.Tensor:
    """What training computes: logits and loss only at supervised positions, the head run in chunks."""
    return model(**batch, loss_chunk_size=chunk_size).loss


def full_vocabulary_loss(model, batch: dict) -> torch.Tensor:
    """The standard computation: logits at every position, then cross-entropy over the supervised ones."""
    out = model(**{k: v for k, v in batch.items() if k != "labels"}, return_logits=True)
    logits = out.logits[:, :-1].float()
    targets = batch["labels"][:, 1:]
    return nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX
    )


def _batch(model, seed: int = 0) -> dict:
    """Two right-padded rows: one with an image, prompt and two answers; one text-only and shorter."""
    g = torch.Generator().manual_seed(seed)
    k = model.num_image_tokens
    vocab = model.llm.get_input_embeddings().num_embeddings
    tok = lambda n: torch.randint(5, vocab, (n,), generator=g).tolist()  # noqa: E731
    a_ids = tok(2) + [IMAGE_TOKEN_ID] * k + tok(4) + tok(6) + tok(3) + tok(5)
    a_lab = [-100] * (2 + k + 4) + a_ids[6 + k : 12 + k] + [-100] * 3 + a_ids[-5:]
    b_ids = tok(5) + tok(4)
    b_lab = [-100] * 5 + b_ids[5:]
    width = len(a_ids)
    ids = torch.zeros(2, width, dtype=torch.long)
    labels = torch.full((2, width), -100)
    mask = torch.zeros(2, width, dtype=torch.long)
    for r, (i, lab) in enumerate(((a_ids, a_lab), (b_ids, b_lab))):
        ids[r, : len(i)], labels[r, : len(lab)], mask[r, : len(i)] = torch.tensor(i), torch.tensor(lab), 1
    size = model.vision.image_size
    pixels = torch.randn(1, 3, size, size, generator=g)
    return dict(
        input_ids=ids,
        labels=labels,
        attention_mask=mask,
        pixel_values=pixels,
        image_counts=torch.tensor([1, 0]),
    )


def _loss_and_grads(model, loss_fn, batch):
    model.zero_grad(set_to_none=True)
    loss = loss_fn(model, batch)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_supervised_positions_only_match_the_full_computation(tiny_config):
    model = build_model(tiny_config("clip", "llama", "mlp", mode="full"))
    batch = _batch(model)
    loss_s, grads_s = _loss_and_grads(model, supervised_loss, batch)
    loss_f, grads_f = _loss_and_grads(model, full_vocabulary_loss, batch)
    assert torch.allclose(loss_s, loss_f, rtol=1e-5, atol=1e-6)
    assert grads_s.keys() == grads_f.keys() and any(n.startswith("llm.") for n in grads_s)
    for name in grads_s:
        assert torch.allclose(grads_s[name], grads_f[name], rtol=1e-4, atol=1e-6), name


def test_chunked_head_matches_the_full_computation(tiny_config):
    model = build_model(tiny_config("clip", "llama", "mlp", mode="full"))
    batch = _batch(model, seed=2)
    n = int((batch["labels"][:, 1:] != -100).sum())
    loss_f, grads_f = _loss_and_grads(model, full_vocabulary_loss, batch)
    for chunk in (1, 4, n - 1):  # several chunks, uneven last chunk
        loss_c, grads_c = _loss_and_grads(model, functools.partial(supervised_loss, chunk_size=chunk), batch)
        assert torch.allclose(loss_c, loss_f, rtol=1e-5, atol=1e-6)
        for name in grads_f:
            assert torch.allclose(grads_c[name], grads_f[name], rtol=1e-4, atol=1e-6), (chunk, name)


def test_supervised_loss_counts_only_supervised_tokens(tiny_config):
    model = build_model(tiny_config("clip", "qwen2", "mlp"))
    batch = _batch(model, seed=1)
    out = model(**batch)
    assert int(out.num_tokens) == int((batch["labels"][:, 1:] != -100).sum())
    assert torch.allclose(out.loss, out.loss_sum / out.num_tokens)
