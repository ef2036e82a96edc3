"""Generation engines behind one interface (``Engine.generate``).

``VLLMEngine`` / ``VLLMServerEngine`` (:mod:`llmq.rollout.vllm`) are imported on first use, so
importing this package never imports vLLM.
"""

from llmq.rollout.base import Completion, Engine, Prompt, SamplingParams
from llmq.rollout.hf import HFEngine

__all__ = ["Completion", "Engine", "HFEngine", "Prompt", "SamplingParams", "VLLMEngine", "VLLMServerEngine"]


def __getattr__(name: str):
    if name in ("VLLMEngine", "VLLMServerEngine"):
        from llmq.rollout import vllm  # imports vLLM (an optional extra) when an engine is built: load it on first use

        return getattr(vllm, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
