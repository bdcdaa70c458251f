"""A quiet start: `mllm` commands print mllm's lines; known-harmless library messages only with --debug; an
install without setuptools' deprecation warnings."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from helpers import make_checkpoint

ROOT = Path(__file__).resolve().parents[1]

QUIET_DRIVER = """
import logging, sys
from mllm.cli import main

rc = main(sys.argv[1:])
# What these libraries print on machines where they do (a CPU with AVX512-BF16, no torchvision, no GPU): their own
# loggers, their own messages; the filters `mllm` installed for this process are what decides.
logging.getLogger("bitsandbytes.backends.cpu.ops").warning(
    "Failed to load CPU gemm_4bit_forward from kernels-community: offline. Please make sure you already `pip install kernels`"
)
from transformers.utils import logging as transformers_logging
transformers_logging.get_logger("transformers.utils.import_utils").warning(
    "`CLIPImageProcessor` requires torchvision (not installed); falling back to `CLIPImageProcessorPil` for backward compatibility."
)
from deepspeed.utils import logger as deepspeed_logger
deepspeed_logger.warning("Setting accelerator to CPU. If you have GPU or other accelerator, we were unable to detect it.")
sys.exit(rc)
"""
LIBRARY_LINES = ("gemm_4bit_forward", "requires torchvision", "Setting accelerator to CPU", "Loading weights")


@pytest.mark.slow
def test_chat_starts_quietly_and_debug_shows_the_library_lines(backbones, tmp_path):
    from mllm.config import ConnectorConfig, LLMConfig, LoraSettings, ModelConfig, VisionConfig

    cfg = ModelConfig(
        vision=VisionConfig(path=backbones["clip"]),
        connector=ConnectorConfig(kind="mlp"),
        llm=LLMConfig(path=backbones["llama"], mode="lora", lora=LoraSettings(r=2)),
        dtype="fp32",
    )
    ckpt = make_checkpoint(tmp_path / "ckpt", cfg, seed=1)
    env = {**os.environ, "TRANSFORMERS_VERBOSITY": "warning"}  # (the tests' conftest quiets transformers)
    argv = [sys.executable, "-c", QUIET_DRIVER, "chat", ckpt, "--prompt", "hi", "--max-new-tokens", "3"]
    quiet = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300)
    assert quiet.returncode == 0, quiet.stderr
    assert len(quiet.stdout.strip().splitlines()) == 1  # the answer, nothing else
    for line in (*LIBRARY_LINES, "parameters:", "trainable"):
        assert line not in quiet.stderr + quiet.stdout, (line, quiet.stderr)
    assert all(line.startswith("runtime:") for line in quiet.stderr.strip().splitlines()), quiet.stderr
    loud = subprocess.run([*argv, "--debug"], capture_output=True, text=True, env=env, timeout=300)
    assert loud.returncode == 0
    for line in LIBRARY_LINES:  # (DeepSpeed's logger writes to stdout)
        assert line in loud.stderr + loud.stdout, (line, loud.stderr)


def test_pyproject_metadata_builds_without_deprecation_warnings():
    """setuptools warns (during every install) about a `license = {text = ...}` table: the SPDX string is current."""
    from setuptools.config.pyprojecttoml import apply_configuration
    from setuptools.dist import Distribution

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dist = apply_configuration(Distribution(), ROOT / "pyproject.toml")
    assert [str(w.message) for w in caught if "license" in str(w.message).lower()] == []
    assert dist.metadata.license_expression == "Apache-2.0"
