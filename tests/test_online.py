"""Online training end to end on the tiny model: method online (objectives shiq, dpo, sft) and TRL's GRPO, the
replay buffer, reward functions with TRL's signature, and what a bad reward function does to a run."""

import json
import os
import textwrap

import numpy as np
import pytest

from llmq.cli import main
from llmq.data.replay import ReplayBuffer, mixed_batches

TINY_ONLINE = """
    model_name_or_path: tiny-llama
    method: online
    task: products_3x1digit
    rounds: 2
    prompts_per_round: 4
    completions_per_prompt: 2
    updates_per_round: 2
    per_device_train_batch_size: 4
    max_new_tokens: 8
    eval_limit: 6
    learning_rate: 1.0e-3
    use_cpu: true
    report_to: none
    disable_tqdm: true
"""


REWARDS_MODULE = '''
import math


def length_bonus(prompts, completions, completion_ids, **columns):
    return [0.01 * len(ids) for ids in completion_ids]


def digit_share(prompts, completions, **columns):
    """A reward the tiny random model's answers differ in: the share of digits in the text."""
    texts = [completion[-1]["content"] for completion in completions]
    return [sum(c.isdigit() for c in text) / max(len(text), 1) for text in texts]


def always_raises(prompts, completions, **columns):
    raise ValueError("no answer")


def nan_on_row_two(prompts, completions, **columns):
    return [math.nan if row == 2 else 0.0 for row in range(len(completions))]


def one_value_too_few(prompts, completions, **columns):
    return [0.0] * (len(completions) - 1)
'''


@pytest.fixture
def my_rewards(tmp_path, monkeypatch):
    """Reward functions with TRL's signature in an importable module ``my_rewards``."""
    (tmp_path / "my_rewards.py").write_text(REWARDS_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))


def write_recipe(tmp_path, text=TINY_ONLINE, **keys):
    path = tmp_path / "recipe.yaml"
    path.write_text(textwrap.dedent(text) + "".join(f"{key}: {value}\n" for key, value in keys.items()))
    return str(path)


def test_the_buffer_keeps_the_newest_rows_and_reads_back_exactly(tmp_path):
    buffer = ReplayBuffer(capacity=5)
    buffer.add([{"x": i} for i in range(3)], round_index=0)
    buffer.add([{"x": i + 0.1} for i in range(3, 7)], round_index=1)
    assert [row["x"] for row in buffer.rows] == [2, 3.1, 4.1, 5.1, 6.1]  # the two oldest left
    assert [row["x"] for row in buffer.older_than(1)] == [2]
    assert buffer.age(2) == {"mean": (2 + 1 + 1 + 1 + 1) / 5, "max": 2.0}
    buffer.save(tmp_path / "buffer.json")
    assert list(ReplayBuffer.load(tmp_path / "buffer.json", capacity=5).rows) == list(buffer.rows)


def test_mixed_batches_take_the_replay_fraction_from_older_rows():
    fresh, replayed = [{"fresh": i} for i in range(6)], [{"old": i} for i in range(20)]
    batches = mixed_batches(fresh, replayed, 0.75, steps=3, batch_size=8, rng=np.random.default_rng(0))
    assert all(len(batch) == 8 and sum("old" in row for row in batch) == 6 for batch in batches)
    seen = [row["fresh"] for batch in batches for row in batch if "fresh" in row]
    assert sorted(seen) == list(range(6))  # each fresh row once before any twice
    first_round = mixed_batches(fresh, [], 0.75, steps=2, batch_size=4, rng=np.random.default_rng(0))
    assert all(len(batch) == 4 and all("fresh" in row for row in batch) for batch in first_round)


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["shiq", "dpo", "sft"])
def test_online_run_on_the_tiny_model(tmp_path, capsys, my_rewards, objective):
    output_dir = tmp_path / "out"
    # The tiny model answers nothing right: its answers differ only in the user's reward function.
    recipe = write_recipe(tmp_path, objective=objective, reward_funcs="[my_rewards:digit_share]", min_score=0.0)
    code = main(["train", recipe, "--output_dir", str(output_dir)])
    assert code == 0, capsys.readouterr().err
    summary = json.loads((output_dir / "summary.json").read_text())
    rounds = summary["rounds"]
    assert [entry["round"] for entry in rounds] == [0, 1, 2]
    assert rounds[0]["sampled_tokens"] == 0 and 0 < rounds[1]["sampled_tokens"] < rounds[2]["sampled_tokens"]
    assert rounds[2]["sampled_tokens"] <= 2 * 4 * 2 * 8  # rounds × prompts × completions × max_new_tokens
    assert all(len(entry["correct"]) == 6 for entry in (rounds[0], rounds[2]))  # before, and after the last round
    assert rounds[2]["buffer_rows"] >= rounds[1]["buffer_rows"] > 0 and rounds[2]["training_tokens"] > 0
    # Round 1 samples the initial model, which is the reference: the KL estimate from the sampler's own
    # log-probabilities of its tokens is 0 (up to the KV cache's rounding), and then the policy moves.
    assert abs(rounds[1]["kl"]) < 1e-3 and abs(rounds[2]["kl"]) > 1e-3
    assert summary["change"]["ci95_paired"][0] < summary["change"]["ci95_paired"][1]
    assert (output_dir / "model.safetensors").is_file()
    assert json.loads((output_dir / "checkpoint-2" / "trainer_state.json").read_text())["rounds_done"] == 2
    assert (
        len(json.loads((output_dir / "checkpoint-2" / "replay_buffer.json").read_text())["rows"])
        == (rounds[2]["buffer_rows"])
    )


@pytest.mark.slow
def test_grpo_run_on_the_tiny_model_logs_the_same_rounds(tmp_path, capsys):
    recipe = write_recipe(
        tmp_path,
        """
        model_name_or_path: tiny-llama
        method: grpo
        task: products_3x1digit
        max_steps: 4
        num_generations: 2
        per_device_train_batch_size: 4
        steps_per_generation: 2
        max_completion_length: 8
        eval_limit: 6
        learning_rate: 1.0e-3
        use_cpu: true
        report_to: none
        save_strategy: "no"
        disable_tqdm: true
        """,
    )
    assert main(["train", recipe, "--output_dir", str(tmp_path / "out")]) == 0, capsys.readouterr().err
    rounds = json.loads((tmp_path / "out" / "summary.json").read_text())["rounds"]
    assert [entry["round"] for entry in rounds] == [0, 1, 2]
    assert rounds[1]["sampled_tokens"] == 8 * 8 and rounds[2]["sampled_tokens"] == 2 * 8 * 8  # every answer cut at 8
    assert len(rounds[2]["correct"]) == 6


@pytest.mark.slow
@pytest.mark.parametrize(
    "function, message",
    [
        ("always_raises", "reward function always_raises failed on row 0: ValueError: no answer"),
        ("nan_on_row_two", "reward function nan_on_row_two returned nan for row 2"),
        ("one_value_too_few", "reward function one_value_too_few returned 7 values for 8 completions"),
    ],
)
def test_a_bad_reward_function_stops_the_run_with_one_line_and_keeps_the_finished_rounds(
    tmp_path, capsys, my_rewards, function, message
):
    output_dir = tmp_path / "out"
    recipe = write_recipe(tmp_path, reward_funcs="[my_rewards:length_bonus]")
    assert main(["train", recipe, "--output_dir", str(output_dir), "--rounds", "1"]) == 0
    capsys.readouterr()
    bad = write_recipe(tmp_path, reward_funcs=f"[my_rewards:length_bonus, my_rewards:{function}]")
    code = main(["train", bad, "--output_dir", str(output_dir), "--rounds", "2", "--resume"])
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert (
        code == 2 and len(errors) == 1 and message in errors[0] and errors[0].startswith("llmq train: error: round 2")
    )
    assert (output_dir / "checkpoint-1" / "replay_buffer.json").is_file()  # the finished round is kept


@pytest.mark.slow
def test_online_lora_with_gradient_checkpointing_references_the_model_without_adapters_and_logs_to_tensorboard(
    tmp_path, capsys, my_rewards
):
    output_dir = tmp_path / "out"
    recipe = write_recipe(
        tmp_path,
        reward_funcs="[my_rewards:digit_share]",
        use_peft="true",
        lora_r=4,
        lora_target_modules="[q_proj, v_proj]",
        gradient_checkpointing="true",
    )
    assert main(["train", recipe, "--output_dir", str(output_dir), "--report_to", "tensorboard"]) == 0
    assert list(output_dir.rglob("events.out.tfevents.*"))  # the rounds' metrics, for TensorBoard
    rounds = json.loads((output_dir / "summary.json").read_text())["rounds"]
    # LoRA starts as the identity, and the reference is the model with its adapters disabled: KL 0 in round 1.
    assert abs(rounds[1]["kl"]) < 1e-3 and abs(rounds[2]["kl"]) > 1e-4
    assert (output_dir / "adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_online_run_in_two_ddp_processes_samples_twice_the_prompts(tmp_path, capsys, monkeypatch, my_rewards):
    """Each process samples and buffers its own prompts; the log sums their sampled tokens."""
    output_dir = tmp_path / "out"
    recipe = write_recipe(tmp_path, reward_funcs="[my_rewards:digit_share]", rounds=1)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")])))
    assert main(["train", recipe, "--output_dir", str(output_dir), "--num_processes", "2"]) == 0
    tokens = json.loads((output_dir / "summary.json").read_text())["rounds"][1]["sampled_tokens"]
    assert 4 * 2 * 8 < tokens <= 2 * 4 * 2 * 8  # more than one process's prompts × completions × 8 tokens
    checkpoint = output_dir / "checkpoint-1"
    assert (checkpoint / "replay_buffer.json").is_file() and (checkpoint / "replay_buffer_1.json").is_file()
