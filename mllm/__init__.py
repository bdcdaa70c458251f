"""mllm: train LLaVA / BLIP-2-style multimodal LLMs — frozen vision tower + frozen LLM + trainable connector."""

from mllm.config import (
    IMAGE_PLACEHOLDER,
    IMAGE_TOKEN_ID,
    ConnectorConfig,
    LLMConfig,
    ModelConfig,
    VisionConfig,
)

__version__ = "0.1.0"


def load_checkpoint(path, **kwargs):
    """A trained checkpoint (or an output directory: its newest complete checkpoint) → `(model, processor)`.

    Needs no DeepSpeed. Keyword arguments go to `mllm.inference.load_pretrained` (dtype, device, load_4bit).
    """
    from mllm.inference import load_pretrained  # heavy imports only when asked

    return load_pretrained(path, **kwargs)


__all__ = [
    "IMAGE_PLACEHOLDER",
    "IMAGE_TOKEN_ID",
    "ConnectorConfig",
    "LLMConfig",
    "ModelConfig",
    "VisionConfig",
    "load_checkpoint",
]
