"""One ``XTrainer(transformers.Trainer)`` + ``XConfig(TrainingArguments)`` pair per method."""

from llmq.trainers.dpo import DPOConfig
from llmq.trainers.shiq import ShiQConfig, ShiQTrainer

__all__ = ["DPOConfig", "ShiQConfig", "ShiQTrainer"]
