"""bench/online_vs_grpo.py's pooling of seeds: accuracies averaged over seeds, ShiQ's difference per question."""

import importlib.util
from pathlib import Path

import pytest

SPEC = importlib.util.spec_from_file_location(
    "online_vs_grpo", Path(__file__).parents[1] / "bench" / "online_vs_grpo.py"
)
bench = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(bench)


def evaluated(base: list[int], shiq: list[int], grpo: list[int]) -> dict:
    """One seed's runs: round 0 (the base model) and round 3 for ShiQ and GRPO."""

    def entry(correct: list[int]) -> dict:
        return {"correct": correct, "accuracy": sum(correct) / len(correct)}

    return {"shiq": {0: entry(base), 3: entry(shiq)}, "grpo": {0: entry(base), 3: entry(grpo)}}


def test_seeds_are_averaged_per_question_before_shiq_is_compared_with_its_peer():
    base = [0, 0, 0, 0]
    pooled = bench.across_seeds(
        {
            0: evaluated(base, shiq=[1, 1, 0, 0], grpo=[1, 0, 0, 0]),
            1: evaluated(base, shiq=[0, 1, 1, 1], grpo=[0, 0, 0, 0]),
        }
    )
    (row,) = pooled["rounds"]
    assert pooled["seeds"] == [0, 1] and row["round"] == 3
    assert row["accuracy"]["shiq"] == {"mean": 0.625, "per_seed": [0.5, 0.75]}
    assert row["accuracy"]["grpo"] == {"mean": 0.125, "per_seed": [0.25, 0.0]}
    difference = row["shiq_minus"]["grpo"]
    # ShiQ - GRPO per question: seed 0 gives 0, 1, 0, 0 and seed 1 gives 0, 1, 1, 1; their means 0, 1, ½, ½ are no
    # longer 0/1 outcomes, so the interval is a bootstrap over the 4 questions.
    assert difference["mean"] == pytest.approx(0.5) and difference["interval"] == "bootstrap"
    low, high = difference["ci95_paired"]
    assert 0.0 <= low < 0.5 < high <= 1.0


def test_a_seed_repeated_pools_to_that_seed_alone():
    one_seed = evaluated([0, 1, 0, 0, 1], shiq=[1, 1, 0, 1, 1], grpo=[0, 1, 1, 0, 0])
    pooled = bench.across_seeds({0: one_seed, 1: one_seed})
    alone = bench.paired_difference(one_seed["grpo"][3]["correct"], one_seed["shiq"][3]["correct"])
    assert pooled["rounds"][0]["shiq_minus"]["grpo"] == alone and alone["interval"] == "newcombe"
