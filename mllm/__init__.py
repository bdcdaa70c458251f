"""mllm: train LLaVA / BLIP-2-style multimodal LLMs — frozen vision tower + frozen LLM + trainable connector."""

from mllm.config import IMAGE_PLACEHOLDER, IMAGE_TOKEN_ID, ConnectorConfig, LLMConfig, ModelConfig, VisionConfig

__version__ = "0.1.0"

__all__ = ["IMAGE_PLACEHOLDER", "IMAGE_TOKEN_ID", "ConnectorConfig", "LLMConfig", "ModelConfig", "VisionConfig"]
