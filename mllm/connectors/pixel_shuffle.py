"""Pixel shuffle (space-to-depth), the token compression of Idefics3 / nanoVLM.

Each s×s block of neighbouring patch features becomes one token of s² times the width, before the projector:
a 24×24 grid of width 1024 with s = 2 becomes a 12×12 grid of width 4096, so an image costs the LLM 4× fewer
visual tokens and the projector sees every patch still.
"""

from __future__ import annotations

import torch


def shuffled_grid(num_tokens: int, factor: int) -> int:
    """Side of the token grid after shuffling a square grid of `num_tokens` by `factor` per side.

    Raises ValueError when the tokens are not a square grid or its side is not a multiple of `factor`.
    """
    side = int(round(num_tokens**0.5))
    if side * side != num_tokens:
        raise ValueError(
            f"pixel_shuffle needs a square patch grid; the vision tower gives {num_tokens} tokens"
        )
    if side % factor:
        raise ValueError(
            f"pixel_shuffle {factor} does not divide the vision tower's {side}×{side} patch grid; choose a factor "
            f"that divides {side} (or change vision.pool / the tower's resolution)"
        )
    return side // factor


def pixel_shuffle(features: torch.Tensor, factor: int) -> torch.Tensor:
    """Tokens of a square grid [B, S*S, D] → [B, (S/f)², f²·D], row-major blocks; f = 1 returns them unchanged.

    Each output token concatenates its f×f block's features in row-major order (row 0's f patches, then row 1's…).
    """
    if factor == 1:
        return features
    b, n, d = features.shape
    out = shuffled_grid(n, factor)
    x = features.reshape(b, out, factor, out, factor, d)  # [B, rows, dy, cols, dx, D]
    x = x.permute(0, 1, 3, 2, 4, 5)  # [B, rows, cols, dy, dx, D]
    return x.reshape(b, out * out, factor * factor * d)
