"""The offline demo: easy-VQA on real pretrained backbones (EfficientNet-Lite0 + SmolLM2-135M-Instruct), two stages."""

from mllm.demo.data import DemoData, build_demo_data
from mllm.demo.pipeline import Demo, DemoError, format_report, train_command
from mllm.demo.settings import DemoSettings, StageSettings, demo_settings

__all__ = [
    "Demo",
    "DemoData",
    "DemoError",
    "DemoSettings",
    "StageSettings",
    "build_demo_data",
    "demo_settings",
    "format_report",
    "train_command",
]
