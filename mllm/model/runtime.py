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
