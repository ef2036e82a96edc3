"""Decoding with Q-functions: token-level Q-guided sampling, implicit-reward beam search, best-of-N
and maj@N with pluggable scorers, and Q* search over reasoning steps."""

from llmq.decoding.guided import QGuidedLogitsProcessor
from llmq.decoding.options import DecodingOptions

__all__ = ["DecodingOptions", "QGuidedLogitsProcessor"]
