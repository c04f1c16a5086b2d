"""Training: `train(load_config("run.yaml", ["lora_rank=16"])[0])` is `lorakit train run.yaml lora_rank=16`."""

from .checkpoint import CheckpointError
from .config import ConfigError, TrainConfig
from .options import config_help, load_config
from .prepare import TrainError
from .trainer import train

__all__ = ["CheckpointError", "ConfigError", "TrainConfig", "TrainError", "config_help", "load_config", "train"]
