"""Known-harmless messages of other libraries, silenced at their source so that mllm's own lines are read.

Each entry is one library logger and the start of the message it drops, with why it is harmless. Nothing else is
muted: every other warning of these loggers, and every other logger, still prints. `--debug` skips all of it.
"""

from __future__ import annotations

import logging

KNOWN_HARMLESS: dict[str, tuple[str, ...]] = {
    # On a CPU with AVX512-BF16, bitsandbytes tries an optional faster 4-bit kernel from the hub at import and
    # falls back to its own (offline, or without the `kernels` package): the same results.
    "bitsandbytes.backends.cpu.ops": ("Failed to load CPU gemm_4bit_forward from kernels-community",),
    # Without torchvision, transformers serves CLIP/SigLIP image processors by their PIL implementation, which
    # mllm wants anyway (the images are PIL images).
    "transformers.utils.import_utils": ("requires torchvision (not installed); falling back to",),
    # DeepSpeed on a machine without a GPU: it runs on the CPU, as mllm asked.
    "DeepSpeed": ("Setting accelerator to CPU",),
}


class DropMessages(logging.Filter):
    """Drops the records whose message starts with (or contains, after a name like `CLIPImageProcessor`) one of
    `fragments`."""

    def __init__(self, fragments: tuple[str, ...]):
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(f in message for f in self.fragments)


def quiet_libraries() -> None:
    """For the `mllm` command (not for library use): filter `KNOWN_HARMLESS` on each library's own logger, and turn
    off transformers' per-file "Loading weights" progress bars (mllm says what it loads)."""
    for name, fragments in KNOWN_HARMLESS.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, DropMessages) for f in logger.filters):
            logger.addFilter(DropMessages(fragments))
    from transformers.utils import logging as transformers_logging  # start-up: not for `mllm --help`

    transformers_logging.disable_progress_bar()
