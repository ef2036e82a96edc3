"""GSM8K answers: gold extraction, strict (``####``) and flexible (last number) extraction, reward.

The reward is math-verify equivalence of the strict answer when the completion has one, else of
the flexible answer; ``strict`` / ``flexible`` in :func:`score_gsm8k` are the exact-match metrics
of lm-evaluation-harness's two GSM8K filters, on normalised numbers.
"""

from __future__ import annotations

import re
from typing import Any

from reward_models.common import completion_text, math_equal

# Thousands separators only in groups of three, so a list "1,2,3" is three numbers, not 123; an exponent belongs to
# its number, so "1.4E-08" is not 8.
_NUMBER = r"-?\$?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?(?:[eE][+-]?\d+)?(?:/\d+)?"
# Not inside a word or a decimal ("x2", "3-5" → 5, not -5).
_FLEXIBLE = re.compile(r"(?<![\w.])" + _NUMBER)
_STRICT_TAIL = re.compile(r"[\s*:]*(" + _NUMBER + ")")


def _normalise(number: str) -> str:
    """``$1,234.50`` → ``1234.5``, ``18.00`` → ``18``: the form used for exact match and votes."""
    number = number.replace(",", "").replace("$", "")
    if "." in number and "/" not in number and "e" not in number.lower():
        number = number.rstrip("0").rstrip(".")
    return "0" if number == "-0" else number


def gold_answer(answer_field: str) -> str:
    """Final answer of a GSM8K ``answer`` field: the text after the last ``####``, commas removed.

    A string without ``####`` is taken as the answer itself, so an already-extracted gold passes through.
    """
    return _normalise(answer_field.rsplit("####", 1)[-1].strip())


def extract_strict(text: str) -> str | None:
    """The number right after the last ``####`` (``$``, ``**`` and ``:`` may precede it), normalised; else None."""
    if "####" not in text:
        return None
    match = _STRICT_TAIL.match(text.rsplit("####", 1)[1])
    return _normalise(match.group(1)) if match else None


def extract_flexible(text: str) -> str | None:
    """The last number anywhere in the text (``$1,234.50``, ``-3``, ``1/2``, ``42.``), normalised; else None."""
    numbers = _FLEXIBLE.findall(text)
    return _normalise(numbers[-1]) if numbers else None


def score_gsm8k(completion: str, gold: str, timeout: float = 5.0) -> dict[str, Any]:
    """Score one completion against a gold answer (or a raw ``answer`` field).

    Returns ``strict`` / ``flexible`` (exact match of each extraction), ``math_verify``
    (equivalence of ``answer``), ``answer`` (the strict answer if present, else the flexible one,
    or None) and ``reward`` (1.0 if ``math_verify`` else 0.0).
    """
    gold = gold_answer(gold)
    strict, flexible = extract_strict(completion), extract_flexible(completion)
    answer = strict if strict is not None else flexible
    equivalent = answer is not None and math_equal(gold, answer, timeout)
    return {
        "strict": strict == gold,
        "flexible": flexible == gold,
        "math_verify": equivalent,
        "answer": answer,
        "reward": 1.0 if equivalent else 0.0,
    }


def gsm8k_reward(completions: list[Any], answer: list[str], **kwargs: Any) -> list[float]:
    """TRL reward function: one 0/1 reward per completion; ``answer`` is the dataset column (raw or final)."""
    return [
        score_gsm8k(completion_text(completion), gold)["reward"]
        for completion, gold in zip(completions, answer, strict=True)
    ]
