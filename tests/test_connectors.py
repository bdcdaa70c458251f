"""Connector shapes and exact parameter counts at LLaVA-1.5-7B sizes (built on the meta device)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from mllm.config import ConnectorConfig
from mllm.connectors import CONNECTORS, Connector, build_connector

VIT_L_336 = dict(vision_dim=1024, vision_tokens=576, llm_dim=4096)


def _count(cfg: ConnectorConfig) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in build_connector(cfg, **VIT_L_336).parameters())


def test_mlp2x_gelu_parameter_count_is_exact():
    assert (
        _count(ConnectorConfig(kind="mlp", projector="mlp2x_gelu")) == 1024 * 4096 + 4096 + 4096 * 4096 + 4096
    )


def test_linear_and_deeper_mlp_counts():
    assert _count(ConnectorConfig(kind="mlp", projector="linear")) == 1024 * 4096 + 4096
    assert _count(ConnectorConfig(kind="mlp", projector="mlp3x_gelu")) == 1024 * 4096 + 4096 + 2 * (
        4096 * 4096 + 4096
    )


@pytest.mark.parametrize("kind", CONNECTORS.names())
def test_every_registered_connector_keeps_the_contract(kind):
    """`Connector`'s contract: a subclass, K known before any forward, [I, N, Dv] → [I, K, D_llm] in its dtype."""
    cfg = ConnectorConfig(kind=kind, num_queries=8, num_layers=2, num_heads=4, hidden_size=32)
    conn = build_connector(cfg, vision_dim=48, vision_tokens=16, llm_dim=64)
    assert isinstance(conn, Connector) and isinstance(conn.num_tokens, int) and conn.num_tokens > 0
    assert conn.instruction_aware is False
    for images in (1, 3):
        out = conn(torch.randn(images, 16, 48))
        assert out.shape == (images, conn.num_tokens, 64) and out.dtype == torch.float32


@pytest.mark.parametrize("kind", ["qformer", "resampler"])
def test_query_connectors_emit_k_tokens(kind):
    cfg = ConnectorConfig(kind=kind, num_queries=8, num_layers=2, num_heads=4, hidden_size=32)
    conn = build_connector(cfg, vision_dim=48, vision_tokens=16, llm_dim=64)
    assert conn.num_tokens == 8
    assert conn(torch.randn(3, 16, 48)).shape == (3, 8, 64)


def qformer_count(k: int, layers: int, w: int, dv: int, dl: int) -> int:
    """BLIP-2 Q-Former, by its parts: per layer a self-attention block (q, k, v, output: 4 linear W→W, one
    LayerNorm), a cross-attention block (q W→W, k and v Dv→W, output W→W, one LayerNorm) and the query
    feed-forward (W→4W→W, one LayerNorm); an input LayerNorm; K query embeddings; the W→Dl projection."""
    linear = lambda i, o: i * o + o  # noqa: E731
    norm = 2 * w
    self_attention = 4 * linear(w, w) + norm
    cross_attention = 2 * linear(w, w) + 2 * linear(dv, w) + norm
    feed_forward = linear(w, 4 * w) + linear(4 * w, w) + norm
    return k * w + norm + layers * (self_attention + cross_attention + feed_forward) + linear(w, dl)


def resampler_count(k: int, layers: int, w: int, dv: int, dl: int) -> int:
    """Perceiver resampler, by its parts: the Dv→W input projection; K latents; per layer two LayerNorms (media,
    latents), attention (in-projection W→3W, output W→W) and a feed-forward (LayerNorm, W→4W→W); a final
    LayerNorm and the W→Dl projection."""
    linear = lambda i, o: i * o + o  # noqa: E731
    norm = 2 * w
    layer = 2 * norm + linear(w, 3 * w) + linear(w, w) + norm + linear(w, 4 * w) + linear(4 * w, w)
    return linear(dv, w) + k * w + layers * layer + norm + linear(w, dl)


@pytest.mark.parametrize(
    "kind,formula,readme",
    [("qformer", qformer_count, 37_826_560), ("resampler", resampler_count, 30_479_360)],
)
def test_query_connector_parameter_counts_are_exact(kind, formula, readme):
    # docs/model.md's table: 32 queries, 2 layers, width = the vision width (1024)
    assert _count(ConnectorConfig(kind=kind)) == formula(32, 2, 1024, 1024, 4096) == readme
    # a narrower connector (width 256 ≠ vision width 1024), other depth and query count
    narrow = ConnectorConfig(kind=kind, num_queries=16, num_layers=3, hidden_size=256, num_heads=8)
    assert _count(narrow) == formula(16, 3, 256, 1024, 4096)


def test_mlp_keeps_one_token_per_patch():
    conn = build_connector(ConnectorConfig(), vision_dim=48, vision_tokens=16, llm_dim=64)
    assert conn.num_tokens == 16 and conn(torch.randn(2, 16, 48)).shape == (2, 16, 64)


def test_bad_connector_settings_are_rejected():
    with pytest.raises(ValueError, match="mlpNx_gelu"):
        ConnectorConfig(kind="mlp", projector="mlp2x_relu")
    with pytest.raises(KeyError, match="unknown connector 'perceiver'; known: mlp, qformer, resampler"):
        build_connector(ConnectorConfig(kind="perceiver"), 8, 4, 8)
    with pytest.raises(ValueError, match="divisible"):
        build_connector(ConnectorConfig(kind="qformer", num_heads=5), 48, 16, 64)


def test_the_documented_connector_sizes_are_what_the_code_builds():
    """docs/model.md's table of connector sizes at LLaVA-1.5-7B scale, row by row, against a fresh count."""
    page = (Path(__file__).resolve().parents[1] / "docs" / "model.md").read_text()
    rows = dict(re.findall(r"^\| (`(?:mlp|qformer|resampler)`[^|]*?) \| ([\d,]+) \|$", page, flags=re.M))
    configs = {
        "`mlp` `linear`": ConnectorConfig(kind="mlp", projector="linear"),
        "`mlp` `mlp2x_gelu` (LLaVA-1.5)": ConnectorConfig(kind="mlp", projector="mlp2x_gelu"),
        "`qformer` (32 queries, 2 layers, width 1024)": ConnectorConfig(kind="qformer"),
        "`resampler` (32 latents, 2 layers, width 1024)": ConnectorConfig(kind="resampler"),
    }
    assert sorted(rows) == sorted(configs)
    for row, cfg in configs.items():
        assert int(rows[row].replace(",", "")) == _count(cfg), row


def test_pixel_shuffle_merges_each_block_into_one_wider_token():
    from mllm.connectors.pixel_shuffle import pixel_shuffle

    # a 4×4 grid whose feature at (row r, col c) is [r, c]: the token of block (1, 0) holds rows 2-3, cols 0-1
    grid = torch.tensor([[r, c] for r in range(4) for c in range(4)], dtype=torch.float32)[None]  # [1, 16, 2]
    out = pixel_shuffle(grid, 2)  # [1, 4, 8]
    assert out.shape == (1, 4, 8)
    assert out[0, 2].tolist() == [2, 0, 2, 1, 3, 0, 3, 1]  # row-major block: (2,0) (2,1) (3,0) (3,1)
    assert out[0, 1].tolist() == [0, 2, 0, 3, 1, 2, 1, 3]
    assert pixel_shuffle(grid, 1) is grid


def test_mlp_with_pixel_shuffle_emits_s_squared_fewer_tokens_from_a_wider_first_layer():
    cfg = ConnectorConfig(kind="mlp", pixel_shuffle=2)
    conn = build_connector(cfg, vision_dim=48, vision_tokens=16, llm_dim=64)
    assert conn.num_tokens == 4 and conn(torch.randn(3, 16, 48)).shape == (3, 4, 64)
    # LLaVA-1.5 sizes, 24×24 grid: 144 tokens, first layer 4·1024 → 4096
    assert _count(cfg) == 4 * 1024 * 4096 + 4096 + 4096 * 4096 + 4096
    with torch.device("meta"):
        assert build_connector(cfg, **VIT_L_336).num_tokens == 144


def test_pixel_shuffle_refuses_a_grid_it_does_not_divide_and_other_connectors():
    with pytest.raises(ValueError, match="pixel_shuffle 3 does not divide the vision tower's 4×4 patch grid"):
        build_connector(ConnectorConfig(pixel_shuffle=3), vision_dim=48, vision_tokens=16, llm_dim=64)
    with pytest.raises(ValueError, match="square patch grid"):
        build_connector(ConnectorConfig(pixel_shuffle=2), vision_dim=48, vision_tokens=12, llm_dim=64)
    with pytest.raises(ValueError, match="setting of the mlp connector"):
        ConnectorConfig(kind="resampler", pixel_shuffle=2)
    with pytest.raises(ValueError, match=">= 1"):
        ConnectorConfig(pixel_shuffle=0)
