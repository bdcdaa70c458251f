"""Shared fixtures: tiny real HF backbone directories, built once per test session."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
logging.getLogger("transformers").setLevel(logging.ERROR)


@pytest.fixture(scope="module")
def one_process_group():
    """Launcher-style variables for a test module, so its in-process runs form a one-process group. The group is
    left standing for the rest of the session: DeepSpeed caches the world group it first saw, so a second group
    formed by a later module would meet that stale one (use with `pytestmark = pytest.mark.usefixtures(...)`)."""
    with pytest.MonkeyPatch.context() as mp:
        for key, value in dict(
            RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_SIZE="1", MASTER_ADDR="127.0.0.1"
        ).items():
            mp.setenv(key, value)
        mp.setenv("MASTER_PORT", str(29500 + os.getpid() % 1000))
        yield


@pytest.fixture(scope="session")
def backbones(tmp_path_factory) -> dict[str, str]:
    """{'clip', 'siglip', 'llama', 'qwen2', 'gpt2', 'phi3'} → directory of a tiny random HF model."""
    from mllm.testing import make_all

    return make_all(str(tmp_path_factory.mktemp("backbones")))


@pytest.fixture(scope="session")
def demo_backbones(tmp_path_factory) -> Path:
    """The demo's backbones folder, SmolLM2 fetched into it (converted from its GGUF, ~40 s) once per session:
    the fetch test checks that fresh write, and the quick demo runs on it."""
    from mllm.demo.pipeline import LLM_NAME
    from mllm.fetch import fetch

    folder = tmp_path_factory.mktemp("demo-backbones")
    fetch(LLM_NAME, str(folder / LLM_NAME))
    return folder


@pytest.fixture
def tiny_config(backbones):
    """A factory: tiny_config(vision='clip', llm='llama', connector='mlp', **connector_kw) → ModelConfig (fp32)."""
    from mllm.config import ConnectorConfig, LLMConfig, ModelConfig, VisionConfig

    def make(vision="clip", llm="llama", connector="mlp", mode="frozen", **connector_kw) -> ModelConfig:
        connector_kw = {"num_queries": 4, "num_heads": 4, **connector_kw}
        return ModelConfig(
            vision=VisionConfig(path=backbones[vision]),
            connector=ConnectorConfig(kind=connector, **connector_kw),
            llm=LLMConfig(path=backbones[llm], mode=mode),
            dtype="fp32",
        )

    return make


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> str:
    """Directory of a tiny random BERT with its WordPiece tokenizer (a Q-Former init)."""
    from mllm.testing import make_bert

    return make_bert(str(tmp_path_factory.mktemp("bert")))
