"""Intervals and estimators: the one home for every confidence interval llmq reports.

- Proportions (accuracy, pass@N, success rate) get the Wilson score interval, which is never zero-width:
  0/500 correct reads "0.0% (95% CI 0.0–0.8%)", not "0.0–0.0%". ``exact_interval`` is Clopper–Pearson.
  Means of values in [0, 1] (pass@k estimates, normalised game scores) get the same Wilson interval on their sum.
- Paired changes of 0/1 outcomes (a question right before, wrong after) get Newcombe's hybrid score
  interval, never zero-width either; paired changes of real values get the bootstrap.
- Means of other real values get scipy's bootstrap, BCa where it is defined and the percentile bootstrap
  where it is not (constant values: the interval is (c, c)). ``mean_interval`` picks between the two.
- ``pass_at_k`` is the unbiased pass@k estimator of Chen et al. (2021); ``best_of_k`` the same kind of estimate for
  best-of-k selection by a scorer.

Numpy and scipy only: this is a primitives layer, it imports nothing else from llmq.
"""

import inspect
import math
import warnings
from collections.abc import Sequence

import numpy as np
import scipy.stats

# scipy >= 1.15 seeds resampling with `rng=`; older releases only take `random_state=`.
_SEED_KEYWORD = "rng" if "rng" in inspect.signature(scipy.stats.bootstrap).parameters else "random_state"


def _check_proportion(successes: int, trials: int, level: float) -> None:
    if trials < 1:
        raise ValueError(f"an interval for a proportion needs at least one trial, got trials={trials}")
    if not 0 <= successes <= trials:
        raise ValueError(f"successes must be between 0 and trials={trials}, got {successes}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")


def wilson_interval(successes: float, trials: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for the proportion ``successes / trials``.

    Never zero-width for trials >= 1 (0/500 gives (0, 0.0076)) and stays inside [0, 1]. ``successes`` may be
    fractional (see :func:`probability_interval`). Raises ValueError when trials == 0.
    """
    _check_proportion(successes, trials, level)
    n, p, z = trials, successes / trials, float(scipy.stats.norm.ppf((1 + level) / 2))
    centre = (p + z**2 / (2 * n)) / (1 + z**2 / n)
    half = z / (1 + z**2 / n) * np.sqrt(p * (1 - p) / n + z**2 / (4 * n**2))
    low = 0.0 if successes == 0 else max(0.0, float(centre - half))  # the edges exactly, not float rounding off them
    high = 1.0 if successes == trials else min(1.0, float(centre + half))
    return low, high


def exact_interval(successes: int, trials: int, level: float = 0.95) -> tuple[float, float]:
    """Clopper–Pearson ("exact") interval for the proportion ``successes / trials``.

    Conservative: its coverage is at least ``level`` for every true proportion. Raises ValueError when trials == 0.
    """
    _check_proportion(successes, trials, level)
    interval = scipy.stats.binomtest(successes, trials).proportion_ci(confidence_level=level, method="exact")
    return float(interval.low), float(interval.high)


def proportion_summary(outcomes: Sequence[bool | int], level: float = 0.95) -> dict:
    """``{"mean", "ci95", "count"}`` of 0/1 outcomes, the shape the evaluation reports use.

    ``ci95`` is the Wilson interval at ``level`` (0.95 by default; the key keeps its name at other levels) and
    ``count`` is the number of successes. Raises ValueError for no outcomes.
    """
    array = np.asarray(outcomes, dtype=float)
    if not np.isin(array, (0.0, 1.0)).all():
        raise ValueError("outcomes must be booleans or 0/1")
    successes = int(array.sum())
    low, high = wilson_interval(successes, len(array), level)
    return {"mean": successes / len(array), "ci95": [low, high], "count": successes}


def probability_interval(probabilities: Sequence[float] | np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """Interval of the mean of per-question values ``p_i`` in [0, 1] (unbiased pass@k estimates, normalised game
    scores): the Wilson interval of ``sum(p_i)`` successes in ``n`` trials.

    A value in [0, 1] with mean p has at most the variance p(1 - p) of a 0/1 outcome with that mean, so the
    interval is conservative, and like any proportion's it is never zero-width (a bootstrap of n equal
    values would give (c, c)).
    """
    values = np.asarray(probabilities, dtype=float).ravel()
    if len(values) == 0 or not ((values >= 0) & (values <= 1)).all():
        raise ValueError("probabilities must be a non-empty sequence of values in [0, 1]")
    return wilson_interval(float(values.sum()), len(values), level)


def mean_interval(values: Sequence[float] | np.ndarray, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Interval of the mean of per-question (per-game) values: :func:`probability_interval` when every value is in
    [0, 1] (0/1 outcomes, normalised scores), else :func:`bootstrap_interval`."""
    values = np.asarray(values, dtype=float).ravel()
    if len(values) and ((values >= 0) & (values <= 1)).all():
        return probability_interval(values, level)
    return bootstrap_interval(values, seed=seed, level=level)


def paired_proportion_interval(
    before: Sequence[bool | int], after: Sequence[bool | int], level: float = 0.95
) -> tuple[float, float]:
    """Interval of ``mean(after) - mean(before)`` for 0/1 outcomes on the same questions: Newcombe's (1998)
    hybrid score interval for paired proportions (his method 10), built from the two Wilson intervals and
    the (corrected) correlation of the pairs. Never zero-width; no resampling.
    """
    before, after = np.asarray(before, dtype=int), np.asarray(after, dtype=int)
    n = len(before)
    a = int(np.sum((after == 1) & (before == 1)))
    b = int(np.sum((after == 1) & (before == 0)))
    c = int(np.sum((after == 0) & (before == 1)))
    d = n - a - b - c
    p1, p2 = (a + b) / n, (a + c) / n
    (l1, u1), (l2, u2) = wilson_interval(a + b, n, level), wilson_interval(a + c, n, level)
    denominator = (a + b) * (c + d) * (a + c) * (b + d)
    # Newcombe's corrected phi: a positive correlation shrunk by n/2, so concordant pairs alone (b = c = 0) do not
    # make the interval collapse to a point.
    concordance = a * d - b * c
    if concordance > 0:
        concordance = max(concordance - n / 2, 0.0)
    phi = concordance / np.sqrt(denominator) if denominator > 0 else 0.0
    delta = np.sqrt(max((p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2, 0.0))
    epsilon = np.sqrt(max((u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2, 0.0))
    return float(max(-1.0, p1 - p2 - delta)), float(min(1.0, p1 - p2 + epsilon))


def bootstrap_interval(
    values: Sequence[float] | np.ndarray, samples: int = 1000, seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
    """Bootstrap interval of the mean of ``values`` (scipy.stats.bootstrap, ``samples`` resamples).

    BCa where it is defined; the percentile bootstrap where it is not (all values equal, where BCa is NaN).
    Constant values give (c, c) and a single value v gives (v, v). Deterministic for a given seed.
    """
    values = np.asarray(values, dtype=float).ravel()
    if len(values) == 0:
        raise ValueError("an interval of the mean needs at least one value")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if len(values) == 1:  # every resample is the one value
        return float(values[0]), float(values[0])
    for method in ("BCa", "percentile"):
        with warnings.catch_warnings(), np.errstate(invalid="ignore", divide="ignore"):
            warnings.simplefilter("ignore", scipy.stats.DegenerateDataWarning)  # BCa undefined: we fall back
            seeded = {_SEED_KEYWORD: np.random.default_rng(seed)}
            result = scipy.stats.bootstrap(
                (values,),
                np.mean,
                n_resamples=samples,
                confidence_level=level,
                method=method,
                vectorized=True,
                **seeded,
            )
        low, high = result.confidence_interval
        if np.isfinite(low) and np.isfinite(high):
            break
    # A resampled mean lies between the smallest and largest value; the clip only removes float rounding.
    low, high = np.clip([low, high], values.min(), values.max())
    return float(low), float(high)


def paired_difference(
    before: Sequence[float] | np.ndarray,
    after: Sequence[float] | np.ndarray,
    samples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> dict:
    """``{"mean", "ci95_paired", "interval"}`` of the per-question differences ``after - before``.

    0/1 outcomes get :func:`paired_proportion_interval` (``interval: "newcombe"``); other values the
    ``bootstrap_interval`` of the differences (``interval: "bootstrap"``, BCa where defined), at ``level``.
    """
    before, after = np.asarray(before, dtype=float), np.asarray(after, dtype=float)
    if before.shape != after.shape:
        raise ValueError(f"before and after must pair up question by question, got {before.shape} and {after.shape}")
    difference = after - before
    if np.isin(before, (0.0, 1.0)).all() and np.isin(after, (0.0, 1.0)).all():
        low, high = paired_proportion_interval(before, after, level)
        return {"mean": float(difference.mean()), "ci95_paired": [low, high], "interval": "newcombe"}
    low, high = bootstrap_interval(difference, samples, seed, level)
    return {"mean": float(difference.mean()), "ci95_paired": [low, high], "interval": "bootstrap"}


def within_question_ranking(scores: Sequence[Sequence[float]], correct: Sequence[Sequence[bool]]) -> dict:
    """How often a scorer ranks a right answer above a wrong one to the same question.

    For each question with both, the fraction of its (right, wrong) pairs scored right > wrong (ties count ½),
    i.e. that question's AUC; ``pairwise_accuracy`` is their mean over those ``questions``, with the
    bootstrap interval over questions (``ci95``; pairs of one question are not independent). ``pairs`` counts all.
    """
    per_question, pairs = [], 0
    for question_scores, question_correct in zip(scores, correct, strict=True):
        right = [s for s, ok in zip(question_scores, question_correct, strict=True) if ok]
        wrong = [s for s, ok in zip(question_scores, question_correct, strict=True) if not ok]
        if right and wrong:
            wins = sum((r > w) + 0.5 * (r == w) for r in right for w in wrong)
            per_question.append(wins / (len(right) * len(wrong)))
            pairs += len(right) * len(wrong)
    if not per_question:
        return {"pairwise_accuracy": None, "ci95": None, "questions": 0, "pairs": 0}
    low, high = bootstrap_interval(per_question)
    return {
        "pairwise_accuracy": float(np.mean(per_question)),
        "ci95": [low, high],
        "questions": len(per_question),
        "pairs": pairs,
    }


def pass_at_k(samples: int, correct: int, k: int) -> float:
    """Unbiased pass@k from ``correct`` of ``samples`` answers (Chen et al. 2021): the chance that ``k`` answers
    drawn without replacement include a correct one, 1 - C(n-c, k) / C(n, k)."""
    if samples - correct < k:
        return 1.0
    return 1.0 - float(np.prod(1.0 - k / np.arange(samples - correct + 1, samples + 1)))


def best_of_k(scores: Sequence[float], correct: Sequence[bool], k: int) -> float:
    """The chance that the highest-scored of ``k`` answers, drawn without replacement from the scored ``n``, is
    correct: the answer with ``i`` lower-scored answers below it is the pick of C(i, k-1) of the C(n, k) draws.
    Equal scores go to the earlier answer, as ``argmax`` picks."""
    n = len(scores)
    if not 1 <= k <= n:
        raise ValueError(f"k must be between 1 and the {n} scored answers, got {k}")
    # Ascending by score; among equal scores the earlier answer ranks higher.
    ranked = sorted(range(n), key=lambda i: (scores[i], -i))
    return sum(math.comb(below, k - 1) for below, i in enumerate(ranked) if correct[i]) / math.comb(n, k)
