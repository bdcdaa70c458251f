"""Sequence packing: row layout, and packed rows computing exactly what the samples compute one by one."""

from __future__ import annotations

import pytest
import torch

from mllm.config import IMAGE_TOKEN_ID
from mllm.data import PackingCollator, pack_rows
from mllm.model import build_model

PAD = 0


def test_pack_rows_first_fit_decreasing():
    lengths = [5, 3, 4, 2, 6]
    rows = pack_rows(lengths, 8)
    assert sorted(i for r in rows for i in r) == list(range(5))
    assert all(sum(lengths[i] for i in r) <= 8 for r in rows)
    assert rows == [[4, 3], [0, 1], [2]]
    with pytest.raises(ValueError, match="9 tokens does not fit a row of 8"):
        pack_rows([9, 1], 8)


def _item(ids, labels, n_images, sid, image_shape=(3, 4, 4), fill=0.0):
    return {
        "input_ids": torch.tensor(ids),
        "labels": torch.tensor(labels),
        "pixel_values": torch.full((n_images, *image_shape), fill),
        "id": sid,
    }


def test_collator_layout():
    k = 2
    a = _item([1, IMAGE_TOKEN_ID, IMAGE_TOKEN_ID, 5, 6], [7, -100, -100, 5, 6], 1, "a", fill=1.0)
    b = _item([2, 3, 4], [2, 3, 4], 0, "b")
    c = _item([8, IMAGE_TOKEN_ID, IMAGE_TOKEN_ID, 9], [8, -100, -100, 9], 1, "c", fill=3.0)
    batch = PackingCollator(PAD, row_width=9)([a, b, c])
    # FFD on lengths [5, 3, 4] into rows of 9: a(5)+c(4), then b(3)
    assert batch["input_ids"].tolist() == [[1, -200, -200, 5, 6, 8, -200, -200, 9], [2, 3, 4] + [PAD] * 6]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 3], [0, 1, 2, 0, 1, 2, 3, 4, 5]]
    # each sample's first label is never a target (the token before it belongs to another sample)
    assert batch["labels"].tolist() == [
        [-100, -100, -100, 5, 6, -100, -100, -100, 9],
        [-100, 3, 4] + [-100] * 6,
    ]
    assert batch["attention_mask"] is None
    assert batch["pixel_values"][:, 0, 0, 0].tolist() == [1.0, 3.0]  # row-major image order: a's, then c's
    assert batch["image_counts"].tolist() == [2, 0] and batch["sample_ids"] == [["a", "c"], ["b"]]
    assert batch["sample_lengths"] == [5, 3, 4] and batch["sample_images"] == [1, 0, 1]
    assert (batch["input_ids"] == IMAGE_TOKEN_ID).sum() == k * 2

    plain = PackingCollator(PAD, pack=False, mask_free=False)([a, b, c])
    assert plain["input_ids"].shape == (3, 5) and plain["position_ids"] is None
    assert plain["attention_mask"].sum(1).tolist() == [5, 3, 4]
    # one sample per row: by default neither mask nor positions (padding only follows real tokens)
    free = PackingCollator(PAD, pack=False)([a, b, c])
    assert free["attention_mask"] is None and free["position_ids"] is None
    assert torch.equal(free["input_ids"], plain["input_ids"]) and torch.equal(free["labels"], plain["labels"])
    assert PackingCollator(PAD).is_mask_free([5, 3, 4])  # nothing fits beside the longest: no row is shared
    assert not PackingCollator(PAD, row_width=9).is_mask_free([5, 3, 4])

    wide = PackingCollator(PAD, pad_to_multiple_of=8)([a, b, c])
    assert wide["input_ids"].shape == (3, 8) and wide["attention_mask"] is None
    assert (wide["labels"][:, 5:] == -100).all() and (wide["input_ids"][:, 5:] == PAD).all()
    assert PackingCollator(PAD, row_width=9, pad_to_multiple_of=4)([a, b, c])["input_ids"].shape == (2, 12)
    with pytest.raises(ValueError, match="pad_to_multiple_of"):
        PackingCollator(PAD, pad_to_multiple_of=0)


def _samples(model, seed=0):
    """Four samples of different lengths, three with an image, with supervised spans."""
    g = torch.Generator().manual_seed(seed)
    k, size = model.num_image_tokens, model.vision.image_size
    vocab = model.llm.get_input_embeddings().num_embeddings
    items = []
    for n, (prompt, answer, image) in enumerate(((3, 5, True), (2, 9, False), (4, 3, True), (1, 6, True))):
        p = torch.randint(5, vocab, (prompt,), generator=g).tolist()
        a = torch.randint(5, vocab, (answer,), generator=g).tolist()
        ids = p[:1] + ([IMAGE_TOKEN_ID] * k if image else []) + p[1:] + a
        labels = [-100] * (len(ids) - answer) + a
        pixels = torch.randn(1 if image else 0, 3, size, size, generator=g)
        items.append(
            {
                "input_ids": torch.tensor(ids),
                "labels": torch.tensor(labels),
                "pixel_values": pixels,
                "id": f"s{n}",
            }
        )
    return items


def _loss_sum_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    keys = ("input_ids", "attention_mask", "labels", "pixel_values", "image_counts", "position_ids")
    out = model(**{k: batch[k] for k in keys if batch.get(k) is not None})
    out.loss_sum.backward()
    return (
        out.loss_sum.detach(),
        int(out.num_tokens),
        {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad},
    )


@pytest.mark.parametrize("llm", ["llama", "qwen2"])
def test_packed_and_unpacked_losses_and_gradients_are_equal(tiny_config, llm):
    model = build_model(tiny_config("clip", llm, "mlp", mode="full"))
    items = _samples(model)
    lengths = sorted(it["input_ids"].numel() for it in items)
    packed = PackingCollator(PAD, row_width=lengths[-1] + lengths[-2])(items)
    plain = PackingCollator(PAD, pack=False, mask_free=False)(items)
    assert packed["input_ids"].shape[0] < plain["input_ids"].shape[0]
    loss_p, n_p, grads_p = _loss_sum_and_grads(model, packed)
    loss_u, n_u, grads_u = _loss_sum_and_grads(model, plain)
    assert n_p == n_u
    assert torch.allclose(loss_p, loss_u, rtol=1e-5)
    for name in grads_u:
        assert torch.allclose(grads_p[name], grads_u[name], rtol=1e-4, atol=1e-6), name


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_explicit_block_mask_is_the_same_computation(tiny_config, attn):
    from mllm.train.batches import ExplicitMask

    cfg = tiny_config("clip", "llama", "mlp", mode="full")
    cfg.attn_implementation = attn
    model = build_model(cfg)
    additive = torch.float32 if attn == "eager" else None
    items = _samples(model, seed=3)
    lengths = sorted(it["input_ids"].numel() for it in items)
    for batch in (
        PackingCollator(PAD, row_width=lengths[-1] + lengths[-2])(items),
        PackingCollator(PAD, pack=False, mask_free=False)(items),
    ):
        explicit = ExplicitMask(additive)(batch)
        assert explicit["attention_mask"].dim() == 4
        assert explicit["attention_mask"].dtype == (additive or torch.bool)
        loss_a, n_a, grads_a = _loss_sum_and_grads(model, batch)
        loss_b, n_b, grads_b = _loss_sum_and_grads(model, explicit)
        assert n_a == n_b and torch.allclose(loss_a, loss_b, rtol=1e-5)
        assert all(torch.allclose(grads_a[n], grads_b[n], rtol=1e-4, atol=1e-6) for n in grads_a)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_mask_free_batches_compute_what_masked_ones_do(tiny_config, attn):
    """One sample per row, right-padded (to a multiple, too): no mask gives the masked batch's loss and gradients."""
    from mllm.train.batches import ExplicitMask

    cfg = tiny_config("clip", "llama", "mlp", mode="full")
    cfg.attn_implementation = attn
    model = build_model(cfg)
    items = _samples(model, seed=5)
    masked = PackingCollator(PAD, pack=False, mask_free=False)(items)
    free = PackingCollator(PAD, pad_to_multiple_of=16)(items)
    assert free["attention_mask"] is None and free["position_ids"] is None
    assert free["input_ids"].shape[1] % 16 == 0 and free["input_ids"].shape[1] > masked["input_ids"].shape[1]
    assert ExplicitMask()(free) is free  # compiled layers: transformers' own causal path
    loss_m, n_m, grads_m = _loss_sum_and_grads(model, masked)
    loss_f, n_f, grads_f = _loss_sum_and_grads(model, free)
    assert n_m == n_f and torch.allclose(loss_m, loss_f, rtol=1e-5)
    for name in grads_m:
        assert torch.allclose(grads_m[name], grads_f[name], rtol=1e-4, atol=1e-6), name


def test_no_attention_across_packed_samples(tiny_config):
    model = build_model(tiny_config("clip", "llama", "mlp"))
    vocab = model.llm.get_input_embeddings().num_embeddings
    a, b = torch.arange(5, 12), torch.arange(20, 26)
    decoder = model.llm.get_decoder()

    def hidden(first, second):
        ids = torch.cat([first, second])[None]
        pos = torch.cat([torch.arange(len(first)), torch.arange(len(second))])[None]
        return decoder(input_ids=ids, position_ids=pos).last_hidden_state[0]

    with torch.no_grad():
        alone_b = decoder(input_ids=b[None]).last_hidden_state[0]
        packed = hidden(a, b)
        changed_a = hidden((a + 7) % vocab, b)
    assert torch.allclose(packed[len(a) :], alone_b, atol=1e-5)  # b sees nothing of a
    assert torch.allclose(changed_a[len(a) :], packed[len(a) :], atol=1e-5)
    assert not torch.allclose(changed_a[: len(a)], packed[: len(a)])
