"""Verifiable rewards for training (TRL reward-function signature) and evaluation (per-answer scores)."""

from reward_models.common import completion_text, math_equal
from reward_models.gsm8k import extract_flexible, extract_strict, gold_answer, gsm8k_reward, score_gsm8k
from reward_models.math import last_boxed, math_reward, score_math
from reward_models.reasoning_gym import score_reasoning_gym

__all__ = [
    "completion_text",
    "extract_flexible",
    "extract_strict",
    "gold_answer",
    "gsm8k_reward",
    "last_boxed",
    "math_equal",
    "math_reward",
    "score_gsm8k",
    "score_math",
    "score_reasoning_gym",
]
