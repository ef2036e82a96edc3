"""Generation engines behind one interface (``Engine.generate``)."""

from llmq.rollout.base import Completion, Engine, Prompt, SamplingParams
from llmq.rollout.hf import HFEngine

__all__ = ["Completion", "Engine", "HFEngine", "Prompt", "SamplingParams"]
