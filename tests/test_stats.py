"""llmq.stats: Wilson and exact intervals for proportions, the bootstrap for means and paired differences, pass@k."""

from itertools import combinations

import numpy as np
import pytest
import scipy.stats

from llmq.stats import (
    _SEED_KEYWORD,
    bootstrap_interval,
    exact_interval,
    mean_interval,
    paired_difference,
    paired_proportion_interval,
    pass_at_k,
    probability_interval,
    proportion_summary,
    wilson_interval,
)

Z95 = 1.959963984540054


def wilson_closed_form(x: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson interval written in counts: (x + z²/2 ± z·sqrt(x(n-x)/n + z²/4)) / (n + z²)."""
    half = z * np.sqrt(x * (n - x) / n + z**2 / 4)
    return (x + z**2 / 2 - half) / (n + z**2), (x + z**2 / 2 + half) / (n + z**2)


@pytest.mark.parametrize("successes, trials", [(0, 500), (3, 10), (10, 100), (47, 50), (1, 1), (250, 500)])
def test_wilson_interval_matches_the_closed_form(successes, trials):
    assert wilson_interval(successes, trials) == pytest.approx(wilson_closed_form(successes, trials), abs=1e-12)


def test_wilson_interval_matches_textbook_values():
    assert wilson_interval(10, 100) == pytest.approx((0.0552, 0.1744), abs=1e-4)
    assert wilson_interval(0, 500) == pytest.approx((0.0, 0.0076), abs=1e-4)
    low, high = wilson_interval(10, 100, level=0.99)
    assert low < 0.0552 and high > 0.1744  # a higher level, a wider interval


@pytest.mark.parametrize("trials", [1, 2, 10, 500, 100_000])
def test_wilson_interval_is_never_zero_width_at_zero_successes(trials):
    low, high = wilson_interval(0, trials)
    assert low == 0.0 and 0.0 < high <= 1.0


@pytest.mark.parametrize("trials", [1, 2, 10, 500, 100_000])
def test_wilson_interval_is_never_zero_width_at_all_successes(trials):
    low, high = wilson_interval(trials, trials)
    assert 0.0 <= low < high and high == 1.0


def test_wilson_interval_covers_the_true_proportion_at_about_the_nominal_rate():
    p, n, draws = 0.1, 50, 2000
    successes = np.random.default_rng(0).binomial(n, p, size=draws)
    intervals = {int(x): wilson_interval(int(x), n) for x in np.unique(successes)}
    coverage = np.mean([intervals[int(x)][0] <= p <= intervals[int(x)][1] for x in successes])
    assert 0.92 <= coverage <= 0.98


@pytest.mark.parametrize("interval", [wilson_interval, exact_interval])
def test_proportion_intervals_reject_impossible_counts(interval):
    for successes, trials in [(0, 0), (-1, 10), (11, 10)]:
        with pytest.raises(ValueError):
            interval(successes, trials)
    with pytest.raises(ValueError):
        interval(1, 10, level=1.0)


@pytest.mark.parametrize("successes, trials", [(0, 500), (3, 10), (10, 100), (47, 50), (1, 1)])
def test_exact_interval_matches_scipy_binomtest_and_contains_the_wilson_centre(successes, trials):
    expected = scipy.stats.binomtest(successes, trials).proportion_ci(method="exact")
    low, high = exact_interval(successes, trials)
    assert (low, high) == pytest.approx((expected.low, expected.high))
    assert low <= (successes + Z95**2 / 2) / (trials + Z95**2) <= high


def test_proportion_summary_has_the_report_shape_with_a_wilson_interval():
    summary = proportion_summary([False] * 500)
    assert set(summary) == {"mean", "ci95", "count"}
    assert summary["mean"] == 0.0 and summary["count"] == 0
    assert summary["ci95"] == list(wilson_interval(0, 500)) and summary["ci95"][0] < summary["ci95"][1]
    summary = proportion_summary([True, False, True, 1, 0])
    assert summary == {"mean": 0.6, "ci95": list(wilson_interval(3, 5)), "count": 3}
    with pytest.raises(ValueError):
        proportion_summary([])
    with pytest.raises(ValueError):
        proportion_summary([0.5, 1.0])


def test_bootstrap_interval_brackets_the_mean():
    values = np.array([1.0] * 30 + [0.0] * 70)
    low, high = bootstrap_interval(values, samples=2000, seed=0)
    assert low < 0.3 < high and 0.18 < low and high < 0.42
    assert isinstance(low, float) and isinstance(high, float)


def test_bootstrap_interval_is_bca_where_it_is_defined():
    values = np.random.default_rng(1).exponential(size=40)  # skewed: BCa and percentile differ
    low, high = bootstrap_interval(values, samples=1000, seed=3)
    bca = scipy.stats.bootstrap(
        (values,), np.mean, n_resamples=1000, method="BCa", **{_SEED_KEYWORD: np.random.default_rng(3)}
    )
    assert (low, high) == pytest.approx(tuple(bca.confidence_interval))


def test_bootstrap_interval_is_deterministic_per_seed():
    values = np.random.default_rng(2).normal(size=50)
    assert bootstrap_interval(values, seed=7) == bootstrap_interval(values, seed=7)
    assert bootstrap_interval(values, seed=7) != bootstrap_interval(values, seed=8)


def test_bootstrap_interval_of_constant_values_is_the_constant_without_warnings(recwarn):
    assert bootstrap_interval(np.zeros(10)) == (0.0, 0.0)  # BCa is undefined here: the percentile fallback
    assert bootstrap_interval([0.1] * 7) == (0.1, 0.1)
    assert bootstrap_interval([3.0]) == (3.0, 3.0)
    assert not recwarn.list
    with pytest.raises(ValueError):
        bootstrap_interval([])


def test_paired_difference_of_identical_results_is_zero_with_an_interval_of_some_width():
    before = [1, 0, 1, 1, 0, 0, 1, 0]
    change = paired_difference(before, before)
    assert set(change) == {"mean", "ci95_paired", "interval"} and change["interval"] == "newcombe"
    low, high = change["ci95_paired"]
    assert change["mean"] == 0.0 and low < 0.0 < high
    assert paired_difference([0.5, 0.2], [0.7, 0.1])["interval"] == "bootstrap"  # scores, not 0/1 outcomes


@pytest.mark.parametrize(
    "both, gained, lost, neither, expected",
    [(36, 12, 2, 0, (0.0569, 0.3404)), (18, 12, 2, 18, (0.0562, 0.3290))],  # Newcombe (1998), method 10
)
def test_the_paired_proportion_interval_matches_newcombes_worked_examples(both, gained, lost, neither, expected):
    after = [1] * both + [1] * gained + [0] * lost + [0] * neither
    before = [1] * both + [0] * gained + [1] * lost + [0] * neither
    assert paired_proportion_interval(before, after) == pytest.approx(expected, abs=5e-5)


@pytest.mark.parametrize("outcome", [0, 1])
def test_a_paired_change_of_proportions_is_never_zero_width(outcome):
    low, high = paired_proportion_interval([outcome] * 200, [outcome] * 200)
    assert low < 0.0 < high and high - low > 0.01  # 0/200 before and after: not "0.0 (0.0 to 0.0)"


def test_the_paired_proportion_interval_covers_the_true_change_at_about_the_nominal_rate():
    rng = np.random.default_rng(1)
    # (P(before), P(after | before right), P(after | before wrong)): correlated pairs, gains, losses, none
    for p_before, keep, gain in [(0.3, 0.9, 0.2), (0.1, 0.5, 0.05), (0.5, 0.7, 0.3), (0.05, 1.0, 0.0)]:
        truth = (p_before * keep + (1 - p_before) * gain) - p_before
        covered = 0
        for _ in range(1000):
            before = rng.random(60) < p_before
            after = np.where(before, rng.random(60) < keep, rng.random(60) < gain)
            low, high = paired_proportion_interval(before, after)
            covered += low <= truth <= high
        assert covered / 1000 >= 0.93, (p_before, keep, gain, covered)


def test_the_interval_of_pass_at_k_estimates_is_wilsons_on_their_sum():
    assert probability_interval([0.0] * 500) == wilson_interval(0, 500) and wilson_interval(0, 500)[1] > 0
    assert probability_interval([1, 0, 1, 1]) == wilson_interval(3, 4)
    low, high = probability_interval([0.25, 0.5, 0.75, 0.5])
    assert low < 0.5 < high
    with pytest.raises(ValueError):
        probability_interval([1.5])


def test_the_interval_of_a_mean_score_in_the_unit_interval_covers_it_and_is_never_zero_width():
    rng = np.random.default_rng(0)
    levels = np.array([0.0, 0.25, 0.5, 0.75, 1.0])  # a game's normalised score: two objects, take and put each
    for weights in ([0.1, 0.2, 0.6, 0.1, 0.0], [0.0, 0.0, 1.0, 0.0, 0.0], [0.5, 0.3, 0.1, 0.05, 0.05]):
        truth, covered = float(levels @ weights), 0
        for _ in range(1000):
            low, high = probability_interval(rng.choice(levels, size=20, p=weights))
            covered += low <= truth <= high
        assert covered / 1000 >= 0.95, (weights, covered)
    low, high = probability_interval([0.5] * 20)  # every game scored alike: a bootstrap would give (0.5, 0.5)
    assert low < 0.5 < high and mean_interval([0.5] * 20) == (low, high)
    assert mean_interval([-1.0, 2.0, 0.5]) == bootstrap_interval([-1.0, 2.0, 0.5])  # unbounded values: the bootstrap


def test_paired_difference_of_a_clear_improvement_excludes_zero():
    rng = np.random.default_rng(0)
    before = rng.random(100) < 0.3
    after = before | (rng.random(100) < 0.5)  # keeps every old success and gains about half the rest
    change = paired_difference(before.astype(int), after.astype(int))
    assert change["mean"] == pytest.approx(np.mean(after) - np.mean(before))
    assert 0.0 < change["ci95_paired"][0] < change["mean"] < change["ci95_paired"][1]
    assert paired_difference(after, before)["ci95_paired"][1] < 0.0  # and the reverse is a clear loss
    with pytest.raises(ValueError):
        paired_difference([1, 0], [1])


def test_pass_at_k_known_values():
    assert pass_at_k(8, 0, 8) == 0.0 and pass_at_k(8, 1, 8) == 1.0
    assert pass_at_k(8, 1, 1) == pytest.approx(1 / 8) and pass_at_k(4, 2, 2) == pytest.approx(5 / 6)
    assert pass_at_k(5, 4, 2) == 1.0


def test_pass_at_k_is_the_chance_that_k_draws_include_a_correct_answer():
    for n in range(1, 8):
        for correct in range(n + 1):
            for k in range(1, n + 1):
                subsets = list(combinations([True] * correct + [False] * (n - correct), k))
                assert pass_at_k(n, correct, k) == pytest.approx(sum(any(s) for s in subsets) / len(subsets))
