"""The multimodal model: vision tower → connector → LLM, its assembly, trainability and runtime choices."""

from mllm.model.build import build_model, load_tokenizer
from mllm.model.multimodal import IGNORE_INDEX, MultimodalLM, MultimodalOutput
from mllm.model.runtime import Runtime, resolve_runtime
from mllm.model.trainability import apply_trainability, format_parameter_table, parameter_table

__all__ = [
    "IGNORE_INDEX",
    "MultimodalLM",
    "MultimodalOutput",
    "Runtime",
    "apply_trainability",
    "build_model",
    "format_parameter_table",
    "load_tokenizer",
    "parameter_table",
    "resolve_runtime",
]
