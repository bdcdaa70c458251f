"""Checks before any compute is spent: the output directory takes files, and its disk has room for checkpoints.

A run that can only fail at its first save (after hours) should fail here, in seconds, saying why.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path

from torch import nn

log = logging.getLogger(__name__)

ADAM_STATE_BYTES = 12
"""Per trainable parameter in the engine files: the fp32 master copy and Adam's two fp32 moments."""
FIXED_BYTES = 2 << 20
"""Configs, RNG states, DeepSpeed's conversion scripts: small, but not nothing on a full disk."""


def check_output_writable(output: Path) -> None:
    """Create `output` if needed and write a file in it; a clear ValueError if either fails."""
    try:
        output.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=output, prefix=".mllm-write-test-"):
            pass
    except OSError as e:
        raise ValueError(
            f"--output {output}: cannot write there ({e.strerror or e}); point --output at a writable directory"
        ) from None


def trainable_count(model: nn.Module) -> int:
    # a ZeRO-3-partitioned parameter is empty locally; ds_numel is its full size
    return sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters() if p.requires_grad)


def checkpoint_bytes(model: nn.Module) -> int:
    """Estimated size of one checkpoint: trainable weights twice (model files + engine module state) in their
    dtype, the optimizer state, and a fixed allowance; 10% on top."""
    weights = sum(
        getattr(p, "ds_numel", p.numel()) * p.element_size() for p in model.parameters() if p.requires_grad
    )
    return int(1.1 * (2 * weights + ADAM_STATE_BYTES * trainable_count(model))) + FIXED_BYTES


def check_disk_space(output: Path, per_checkpoint: int, checkpoints: int) -> None:
    """Stop unless the disk holding `output` has room for `checkpoints` more checkpoints of `per_checkpoint` bytes."""
    free = shutil.disk_usage(output).free
    needed = per_checkpoint * checkpoints
    if free < needed:
        raise ValueError(
            f"--output {output}: {_size(free)} free on its disk, but this run needs about {_size(needed)} for "
            f"{checkpoints} checkpoint(s) of ~{_size(per_checkpoint)} (trainable weights + optimizer state); "
            "free some space, point --output at a larger disk, or lower --keep-last"
        )
    log.info("disk: %s free at %s; a checkpoint takes ~%s", _size(free), output, _size(per_checkpoint))


def checkpoints_needed(
    total_steps: int, start_step: int, save_every: int, keep_last: int, existing: int
) -> int:
    """How many more checkpoints the disk must hold at the run's peak: `existing` ones stay until pruned, and a
    new one is written before the oldest is deleted (so keep_last + 1 exist for a moment)."""
    saves = {total_steps} | (set(range(save_every, total_steps + 1, save_every)) if save_every else set())
    remaining = len([s for s in saves if s > start_step])
    peak = existing + remaining if keep_last == 0 else min(keep_last + 1, existing + remaining)
    return max(peak - existing, 0)


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"
