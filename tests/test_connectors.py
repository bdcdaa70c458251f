"""Connector shapes and exact parameter counts at LLaVA-1.5-7B sizes (built on the meta device)."""

from __future__ import annotations

import pytest
import torch

from mllm.config import ConnectorConfig
from mllm.connectors import build_connector

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


@pytest.mark.parametrize("kind", ["qformer", "resampler"])
def test_query_connectors_emit_k_tokens(kind):
    cfg = ConnectorConfig(kind=kind, num_queries=8, num_layers=2, num_heads=4, hidden_size=32)
    conn = build_connector(cfg, vision_dim=48, vision_tokens=16, llm_dim=64)
    assert conn.num_tokens == 8
    assert conn(torch.randn(3, 16, 48)).shape == (3, 8, 64)
    assert _count(ConnectorConfig(kind=kind)) > 0


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
