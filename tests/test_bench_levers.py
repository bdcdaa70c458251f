"""The compile lever: compiled decoder layers (eager attention inside) compute the same loss and gradients."""

from __future__ import annotations

import pytest
import torch

from mllm.bench.ours import compile_decoder_layers, supervised_loss, with_explicit_mask
from mllm.config import IMAGE_TOKEN_ID
from mllm.data.packing import PackingCollator
from mllm.model import build_model


def _items(model, lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    k, size = model.num_image_tokens, model.vision.image_size
    vocab = model.llm.get_input_embeddings().num_embeddings
    items = []
    for n, length in enumerate(lengths):
        text = torch.randint(5, vocab, (length,), generator=g).tolist()
        ids = text[:1] + [IMAGE_TOKEN_ID] * k + text[1:]
        labels = [-100] * (k + 3) + ids[k + 3 :]
        pixels = torch.randn(1, 3, size, size, generator=g)
        items.append(
            {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels), "pixel_values": pixels, "id": n}
        )
    return items


@pytest.mark.slow
def test_compiled_layers_match_eager(tiny_config, tmp_path, monkeypatch):
    # a private inductor cache: a compile killed elsewhere can leave a truncated kernel in the shared one
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    cfg = tiny_config("clip", "llama", "mlp", mode="full")
    cfg.attn_implementation = "eager"  # what the compile lever runs: inductor fuses the eager attention
    model = build_model(cfg)
    collate = PackingCollator(0)
    batches = [
        with_explicit_mask(collate(_items(model, lengths, seed=i)), torch.float32)
        for i, lengths in enumerate(([6, 9, 7], [12, 5, 8, 8]))
    ]  # two shapes: compiled once, dynamic

    def run():
        out = []
        for b in batches:
            model.zero_grad(set_to_none=True)
            loss = supervised_loss(model, b)
            loss.backward()
            out.append(
                (loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
            )
        return out

    eager = run()
    assert compile_decoder_layers(model) == model.llm.config.num_hidden_layers
    compiled = run()
    for (le, ge), (lc, gc) in zip(eager, compiled, strict=True):
        assert torch.allclose(le, lc, rtol=1e-4)
        for name in ge:
            assert torch.allclose(ge[name], gc[name], rtol=1e-3, atol=1e-5), name
