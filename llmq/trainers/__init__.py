"""One ``XTrainer(transformers.Trainer)`` + ``XConfig(TrainingArguments)`` pair per method."""

from llmq.trainers.shiq import ShiQConfig, ShiQTrainer
from llmq.trainers.trl_configs import DPOConfig, SFTConfig

__all__ = ["DPOConfig", "SFTConfig", "ShiQConfig", "ShiQTrainer"]
