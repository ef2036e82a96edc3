"""MATH / MATH-500 answers: the last ``\\boxed{...}`` of a completion, checked with math-verify."""

from __future__ import annotations

import re
from typing import Any

from reward_models.common import completion_text, math_equal

# Not followed by a letter: "\\boxedx" would be another macro, while "\\boxed5" is "\\boxed{5}".
_BOX = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])\s*")
# The brace-less "\\boxed 5" takes one token; some MATH solutions write "$\\boxed 5$".
_BARE_ARGUMENT = re.compile(r"[^\s$]+")


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` / ``\\fbox{...}`` (nested braces matched) or ``\\boxed 5``, stripped.

    None when there is none, or when the last one is unbalanced (a truncated completion).
    Escaped braces ``\\{`` ``\\}`` do not count.
    """
    boxes = list(_BOX.finditer(text))
    if not boxes:
        return None
    start = boxes[-1].end()
    if not text.startswith("{", start):
        bare = _BARE_ARGUMENT.match(text, start)
        # "\\boxed 42." ends a sentence: the period is not part of the answer.
        answer = bare.group().rstrip(".,;:") if bare else ""
        return answer or None
    depth, index = 1, start + 1
    while index < len(text):
        char = text[index]
        if char == "\\":
            index += 2
            continue
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return text[start + 1 : index].strip()
        index += 1
    return None


def score_math(completion: str, gold: str, timeout: float = 5.0) -> dict[str, Any]:
    """Score one completion against a MATH gold answer.

    ``gold`` is a LaTeX answer (``\\frac{\\sqrt{3}}{2}``, ``\\left( 3, \\frac{\\pi}{2} \\right)``)
    or a full solution, whose last box is then used.  Returns ``answer`` (the last boxed content
    or None), ``math_verify`` and ``reward`` (1.0 / 0.0).
    """
    boxed_gold = last_boxed(gold)
    gold = boxed_gold if boxed_gold is not None else gold.strip()
    answer = last_boxed(completion)
    # Both sides boxed again: math-verify does not parse bare LaTeX such as "\frac{\sqrt{3}}{2}".
    equivalent = bool(answer) and math_equal(f"\\boxed{{{gold}}}", f"\\boxed{{{answer}}}", timeout)
    return {"answer": answer, "math_verify": equivalent, "reward": 1.0 if equivalent else 0.0}


def math_reward(completions: list[Any], answer: list[str], **kwargs: Any) -> list[float]:
    """TRL reward function: one 0/1 reward per completion; ``answer`` is the dataset's gold column."""
    return [
        score_math(completion_text(completion), gold)["reward"]
        for completion, gold in zip(completions, answer, strict=True)
    ]
