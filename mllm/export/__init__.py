"""Export a checkpoint: merge LoRA into a standalone checkpoint, or write the transformers LLaVA layout.

Supported combinations, per format:

- `--merge-lora`: checkpoints whose LLM was trained in mode `lora` or `qlora` (QLoRA adapters are merged into
  the unquantised base, so the result matches the adapters on the full-precision base, not on the 4-bit one).
- `--format hf-llava`: see `mllm.export.hf_llava.SUPPORTED`.
"""

from mllm.export.hf_llava import SUPPORTED as HF_LLAVA_SUPPORTED
from mllm.export.hf_llava import (
    ExportError,
    build_llava,
    check_exportable,
    export_hf_llava,
    processor_chat_template,
)
from mllm.export.merge import merge_lora, write_merged_checkpoint

__all__ = [
    "HF_LLAVA_SUPPORTED",
    "ExportError",
    "build_llava",
    "check_exportable",
    "export_hf_llava",
    "merge_lora",
    "processor_chat_template",
    "write_merged_checkpoint",
]
