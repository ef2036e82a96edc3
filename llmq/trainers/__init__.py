"""One ``XTrainer(transformers.Trainer)`` + ``XConfig(TrainingArguments)`` pair per method."""

from llmq.trainers.critic import CriticConfig, CriticTrainer
from llmq.trainers.shiq import ShiQConfig, ShiQTrainer
from llmq.trainers.trl_configs import DPOConfig, SFTConfig

__all__ = ["CriticConfig", "CriticTrainer", "DPOConfig", "SFTConfig", "ShiQConfig", "ShiQTrainer"]
