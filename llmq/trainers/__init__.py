"""One ``XTrainer(transformers.Trainer)`` + ``XConfig(TrainingArguments)`` pair per method."""

from llmq.trainers.shiq import ShiQConfig, ShiQTrainer

__all__ = ["ShiQConfig", "ShiQTrainer"]
