"""Choose attention implementation and compute dtype from what the machine has."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import torch

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def cpu_has_fast_bf16() -> bool:
    """True when the CPU has native bf16 matmul (AVX512-BF16 or AMX), where bf16 runs ~2× fp32."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def flash_attn_available() -> bool:
    return torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None


@dataclass(frozen=True)
class Runtime:
    dtype: torch.dtype
    attn_implementation: str
    device: torch.device

    def describe(self) -> str:
        return f"device={self.device} dtype={str(self.dtype).removeprefix('torch.')} attention={self.attn_implementation}"


def resolve_runtime(
    dtype: str = "auto", attn_implementation: str = "auto", device: str | None = None
) -> Runtime:
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dtype == "auto":
        if dev.type == "cuda":
            resolved = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
        else:
            resolved = torch.bfloat16 if cpu_has_fast_bf16() else torch.float32
    elif dtype in _DTYPES:
        resolved = _DTYPES[dtype]
    else:
        raise ValueError(f"dtype must be auto|bf16|fp16|fp32, got {dtype!r}")
    if attn_implementation == "auto":
        attn = (
            "flash_attention_2"
            if dev.type == "cuda" and flash_attn_available() and resolved != torch.float32
            else "sdpa"
        )
    else:
        attn = attn_implementation
    return Runtime(dtype=resolved, attn_implementation=attn, device=dev)


EAGER_MAX_TOKENS = 256
"""On a CPU, rows up to this long train faster with eager attention than with SDPA (see `training_attention`)."""

EAGER_MAX_TOKENS_COMPILED = 512
"""The same bound when the decoder layers are compiled (`--compile`): inductor fuses eager attention's
matmul-softmax-matmul, forward and backward, beating the CPU flash kernel for longer rows; it keeps the
[rows, heads, T, T] probabilities for backward, which stays small only for short rows (docs/measurements.md)."""


def training_attention(requested: str, runtime: Runtime, longest_row: int, compiled: bool = False) -> str:
    """The attention kernel a training run uses, once its data (hence its longest row) is known: the one rule.

    `auto` on a CPU picks eager for short rows: PyTorch's CPU flash-attention backward is slow on small
    blocks, while eager's quadratic scores lose on long rows (docs/performance.md has the
    timings). Compiled layers keep eager up to `EAGER_MAX_TOKENS_COMPILED`. Anything else is kept (auto on CUDA: flash-attn if installed, else SDPA).
    """
    bound = EAGER_MAX_TOKENS_COMPILED if compiled else EAGER_MAX_TOKENS
    if requested == "auto" and runtime.device.type == "cpu" and longest_row <= bound:
        return "eager"
    return runtime.attn_implementation
