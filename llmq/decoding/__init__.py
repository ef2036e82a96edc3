"""Decoding with Q-functions: token-level Q-guided sampling and implicit-reward beam search."""

from llmq.decoding.guided import QGuidedLogitsProcessor
from llmq.decoding.options import DecodingOptions

__all__ = ["DecodingOptions", "QGuidedLogitsProcessor"]
