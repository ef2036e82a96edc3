"""bench/digiq_screens_cost.py on a tiny random Idefics3: it times both ways of scoring a state's commands beside its
screen and an actor step, and scales them by the stage sizes it counts in a text run's data."""

import importlib.util
import json
from pathlib import Path

import pytest

pytest.importorskip("textworld", reason="TextWorld is not installed (the agents extra: pip install 'llmq[agents]')")

import datasets  # noqa: E402

from llmq.envs.textworld import render_state  # noqa: E402

SPEC = importlib.util.spec_from_file_location(
    "digiq_screens_cost", Path(__file__).parents[1] / "bench" / "digiq_screens_cost.py"
)
bench = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(bench)


@pytest.mark.slow
def test_the_screens_cost_bench_counts_the_text_runs_stages_and_times_both_ways_of_scoring(tmp_path):
    states = [
        render_state("eat the apple", [], "A kitchen. An apple."),
        render_state("eat the apple", ["look"], "A kitchen."),
    ]
    rows = [
        {
            "state": states[0],
            "next_state": states[1],
            "action": "look",
            "admissible": ["look", "take apple", "eat apple"],
        },
        {"state": states[1], "next_state": "the end", "action": "eat apple", "admissible": ["look", "eat apple"]},
    ]
    run = tmp_path / "text_run"
    datasets.Dataset.from_list(rows).save_to_disk(str(run / "trajectories"))
    summary = {"before": {"steps_mean": 8.0}, "after": {"steps_mean": 4.0}, "extraction": {"kept": 9}}
    (run / "summary.json").write_text(json.dumps(summary))
    output = tmp_path / "cost.json"
    argv = ["--model", "tiny-idefics3", "--text_run", str(run), "--states", "2", "--actor_batch", "1"]
    assert bench.main([*argv, "--output", str(output)]) == 0
    result = json.loads(output.read_text())
    assert result["screen_tiles"] == 5 and result["commands_timed"] == 5  # 2×2 tiles and the whole screen
    assert result["counts"] == {
        "logged_steps": 2,
        "distinct_states": 3,
        "commands_per_step": 2.5,
        "evaluated_states": 240,
    }
    # 2 logged steps + 3 states' features + 20 test games × (8 + 4) steps; 9 kept rows in steps of the recipe's 4
    assert result["expected"]["states_scored_with_their_commands"] == 245 and result["expected"]["actor_steps"] == 2
    assert result["forward_tflops"] > 0 and result["cached_prompt_s_per_state"] > 0 and result["actor_step_s"] > 0
    assert bench.main(["--text_run", str(tmp_path / "missing")]) == 2
