"""Training: run config, the DeepSpeed wrapper, the data stream, the loop, checkpoints and progress reports.

cfg = resolve_config(stage=1, vision=..., llm=..., data=..., output=...)
summary = train(cfg)
"""

from mllm.train.config import STAGE_PRESETS, TrainConfig, add_config_arguments, resolve_config
from mllm.train.loop import train

__all__ = ["STAGE_PRESETS", "TrainConfig", "add_config_arguments", "resolve_config", "train"]
