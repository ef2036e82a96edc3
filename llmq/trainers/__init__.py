"""One ``XTrainer`` + ``XConfig(TrainingArguments)`` pair per method (TRL's own trainers for DPO, SFT and GRPO)."""

from llmq.trainers.critic import CriticConfig, CriticTrainer
from llmq.trainers.online import OnlineConfig, OnlineTrainer
from llmq.trainers.shiq import ShiQConfig, ShiQTrainer
from llmq.trainers.trl_configs import DPOConfig, GRPOConfig, SFTConfig

__all__ = [
    "CriticConfig",
    "CriticTrainer",
    "DPOConfig",
    "GRPOConfig",
    "OnlineConfig",
    "OnlineTrainer",
    "SFTConfig",
    "ShiQConfig",
    "ShiQTrainer",
]
