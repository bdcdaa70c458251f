"""Export a checkpoint: merge LoRA into a standalone checkpoint, or write a transformers layout.

`EXPORT_FORMATS` is the one registry of transformers layouts `mllm export --format` writes; each entry says what
its classes cannot express (checked before any weights load) and writes the directory:

- `hf-llava`: `LlavaForConditionalGeneration` + `LlavaProcessor` (see `mllm.export.hf_llava.SUPPORTED`);
- `hf-llava-next`: `LlavaNextForConditionalGeneration` + `LlavaNextProcessor` for an `anyres` model (see
  `mllm.export.hf_llava_next.SUPPORTED`);
- `hf-blip2` / `hf-instructblip`: `Blip2ForConditionalGeneration` / `InstructBlipForConditionalGeneration` + their
  processors (see `mllm.export.hf_blip2.SUPPORTED`); `import_hf_blip2` reads those layouts back in.

`--merge-lora`: checkpoints whose LLM was trained in mode `lora` or `qlora` (QLoRA adapters are merged into the
unquantised base, so the result matches the adapters on the full-precision base, not on the 4-bit one).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

from mllm.config import ModelConfig
from mllm.export import hf_blip2, hf_llava, hf_llava_next
from mllm.export.hf_blip2 import export_hf_blip2, import_hf_blip2
from mllm.export.hf_llava import SUPPORTED as HF_LLAVA_SUPPORTED
from mllm.export.hf_llava import (
    ExportError,
    build_llava,
    check_exportable,
    export_hf_llava,
    processor_chat_template,
)
from mllm.export.merge import merge_lora, write_merged_checkpoint
from mllm.registry import Registry


@dataclass(frozen=True)
class ExportFormat:
    help: str
    check: Callable[[ModelConfig], None]
    """Raise `ExportError` with every reason the saved config cannot be expressed (before loading weights)."""
    write: Callable[..., object]
    """`write(model, config, tokenizer, template_jinja, out)` → the written directory."""


EXPORT_FORMATS: Registry[ExportFormat] = Registry("export format")
EXPORT_FORMATS.register("hf-llava")(
    ExportFormat(
        "a transformers LlavaForConditionalGeneration + processor (mlp2x_gelu connector, HF vision tower)",
        check_exportable,
        hf_llava.export_hf_llava,
    )
)
EXPORT_FORMATS.register("hf-llava-next")(
    ExportFormat(
        "a transformers LlavaNextForConditionalGeneration + processor (anyres, mlp2x_gelu connector, HF vision tower)",
        hf_llava_next.check_exportable,
        hf_llava_next.export_hf_llava_next,
    )
)


def _write_blip2(model, config, tokenizer, _template_jinja, out, *, fmt: str):
    return export_hf_blip2(
        model, config, tokenizer, out, fmt
    )  # transformers' processor brings its own layout


for _name, _family in hf_blip2.FAMILIES.items():
    EXPORT_FORMATS.register(_name)(
        ExportFormat(
            f"a transformers {_family.model_class} + processor (qformer connector, BLIP-2 vision tower)",
            partial(hf_blip2.check_exportable, fmt=_name),
            partial(_write_blip2, fmt=_name),
        )
    )

__all__ = [
    "EXPORT_FORMATS",
    "HF_LLAVA_SUPPORTED",
    "ExportError",
    "ExportFormat",
    "build_llava",
    "check_exportable",
    "export_hf_blip2",
    "export_hf_llava",
    "import_hf_blip2",
    "merge_lora",
    "processor_chat_template",
    "write_merged_checkpoint",
]
