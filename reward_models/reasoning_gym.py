"""reasoning-gym answers: the last number of the completion, verified by the dataset's own ``score_answer``."""

from __future__ import annotations

from typing import Any

from reward_models.gsm8k import extract_flexible


def score_reasoning_gym(completion: str, gold: str, dataset: Any) -> dict[str, Any]:
    """Score one completion of a reasoning-gym question whose verifier reads only the gold answer.

    ``dataset`` is the reasoning-gym dataset the question came from (its ``score_answer(answer, entry)``
    decides); the answer is the completion's last number (``extract_flexible``), the form in which a
    small chat model states a result. Returns ``answer`` (or None) and ``reward`` (reasoning-gym's score,
    in [0, 1]; 1.0 is a correct answer).
    """
    answer = extract_flexible(completion)
    reward = 0.0 if answer is None else float(dataset.score_answer(answer, {"answer": gold}))
    return {"answer": answer, "reward": reward}
