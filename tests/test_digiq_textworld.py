"""Digi-Q end to end on real TextWorld games with a tiny model, and the likelihood policy it acts with."""

import json

import datasets
import numpy as np
import pytest
import torch

pytest.importorskip("textworld", reason="TextWorld is not installed (the agents extra: pip install 'llmq[agents]')")

from llmq.cli import main  # noqa: E402
from llmq.envs.textworld import (  # noqa: E402
    command_logprobs,
    likelihood_policy,
    policy_prompt,  # noqa: E402
)
from llmq.mdp import token_logprobs  # noqa: E402


def test_command_logprobs_are_the_reply_log_likelihoods(tiny_model_and_tokenizer):
    model, tokenizer = tiny_model_and_tokenizer
    states, admissible = (
        ["Goal: eat the apple", "Goal: open the door\nYou see a door."],
        [["take apple", "eat apple"], ["open door", "look", "go north"]],
    )
    scores = command_logprobs(model, tokenizer, states, admissible, batch_size=2)
    assert [len(s) for s in scores] == [2, 3]
    prompt = tokenizer.apply_chat_template(
        policy_prompt(states[1], admissible[1]), tokenize=False, add_generation_prompt=True
    )
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    ids = torch.tensor(
        [prompt_ids + tokenizer("go north" + tokenizer.eos_token, add_special_tokens=False)["input_ids"]]
    )
    with torch.no_grad():
        logp, _ = token_logprobs(model(ids).logits, ids)
    assert scores[1][2] == pytest.approx(logp[0, len(prompt_ids) :].sum().item(), abs=1e-4)
    greedy = likelihood_policy(model, tokenizer)(states, admissible)
    assert greedy == [commands[int(np.argmax(s))] for commands, s in zip(admissible, scores)]
    sampled = likelihood_policy(model, tokenizer, temperature=100.0, seed=0)(states * 20, admissible * 20)
    assert all(a in commands for a, commands in zip(sampled, admissible * 20)) and len(set(sampled[1::2])) > 1


def tiny_digiq_argv(out, games_dir, **settings) -> list[str]:
    """`llmq train` arguments of Digi-Q with the tiny model on two tiny TextWorld train games and one test game."""
    settings = {
        "train_games": 2,
        "test_games": 1,
        "episode_steps": 3,
        "episodes_per_game": 1,
        "critic_steps": 10,
        "critic_batch_size": 4,
        "critic_hidden_size": 16,
        "threshold": -1000,  # keeps every state
        "max_steps": 1,
        "per_device_train_batch_size": 2,
        "report_to": "none",
        "save_strategy": "no",
        "use_cpu": "true",
        "max_length": 2048,  # the tiny model's byte tokenizer makes a policy prompt over 1,024 tokens
        **settings,
    }
    flags = [item for key, value in settings.items() for item in (f"--{key}", str(value))]
    return [
        "train",
        "--method",
        "digiq",
        "--model_name_or_path",
        "tiny-llama",
        "--output_dir",
        str(out),
        "--games_dir",
        str(games_dir),
        *flags,
    ]


@pytest.mark.slow
def test_llmq_train_digiq_runs_end_to_end_on_tiny_games(tmp_path, tiny_model_dir):
    out = tmp_path / "digiq"
    argv = tiny_digiq_argv(out, tmp_path / "games", critic_steps=20, representation_steps=2, max_steps=2)
    assert main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == "digiq" and summary["data"]["transitions"] == len(
        datasets.load_from_disk(str(out / "trajectories"))
    )
    assert summary["extraction"]["kept"] == summary["extraction"]["states"]  # threshold -1000 keeps every state
    extracted = datasets.load_from_disk(str(out / "extracted"))
    assert extracted[0]["completion"][0]["role"] == "assistant" and extracted[0]["prompt"][-1]["role"] == "user"
    assert {"success_rate", "normalized_score"} <= set(summary["change"])
    assert len(list((out / "features").glob("*.safetensors"))) == 1 and (out / "model.safetensors").is_file()
    assert (out / "critic" / "model.safetensors").is_file()
    assert summary["representation"]["rows"] > 0 and 0 <= summary["representation"]["yes_fraction"] <= 1


@pytest.mark.slow
def test_a_killed_digiq_run_resumes_after_its_recorded_stages(tmp_path, tiny_model_dir, monkeypatch, capsys):
    import llmq.methods.digiq

    out = tmp_path / "digiq"
    argv = tiny_digiq_argv(out, tmp_path / "games")

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("trl.SFTTrainer.train", killed)  # killed when the actor's fine-tuning starts
    assert main(argv) == 130
    stages = json.loads((out / "stages.json").read_text())
    assert {"before", "data", "critic", "extraction"} <= set(stages) and not (out / "summary.json").exists()
    monkeypatch.undo()

    def not_again(*args, **kwargs):
        raise AssertionError("a recorded stage ran again")

    monkeypatch.setattr(llmq.methods.digiq, "fit_critic_and_extract", not_again)
    monkeypatch.setattr("llmq.envs.textworld.collect_trajectories", not_again)
    assert main([*argv, "--resume"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["extraction"] == stages["extraction"] and summary["before"]["games"] == stages["before"]["games"]
    assert summary["data"]["transitions"] == len(datasets.load_from_disk(str(out / "trajectories")))

    other = [*argv, "--resume"]
    other[other.index("--critic_steps") + 1] = "11"
    assert main(other) == 2  # the record of other settings is not taken for this run's
    assert "critic_steps" in capsys.readouterr().err


@pytest.mark.slow
def test_a_run_killed_after_its_representation_stage_resumes_with_the_same_backbone(
    tmp_path, tiny_model_dir, monkeypatch
):
    import llmq.methods.digiq

    out = tmp_path / "digiq"
    argv = tiny_digiq_argv(out, tmp_path / "games", representation_steps=2)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(llmq.methods.digiq, "fit_critic", killed)  # killed once the features are read
    assert main(argv) == 130
    stages = json.loads((out / "stages.json").read_text())
    assert "representation" in stages and "critic" not in stages
    monkeypatch.undo()

    def not_again(*args, **kwargs):
        raise AssertionError("the representation fine-tuning ran again")

    monkeypatch.setattr(llmq.methods.digiq, "representation_backbone", not_again)
    assert main([*argv, "--resume"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["representation"] == stages["representation"]
    # the features cache is keyed by the backbone's weights: one file means the resumed backbone's are the same
    assert len(list((out / "features").glob("*.safetensors"))) == 1


def test_actionability_labels_follow_changes_of_the_world(tmp_path):
    from llmq.envs.textworld import collect_trajectories, make_games, random_policy, walkthrough_policy
    from llmq.methods.digiq import ACTIONABILITY_QUESTION, actionability_rows

    games = make_games(tmp_path, count=2, seed=0, rooms=1, nb_objects=3, quest_length=2)
    walkthrough = actionability_rows(
        collect_trajectories(walkthrough_policy(games), games, episodes_per_game=1, max_steps=10)
    )
    assert walkthrough and all(
        row["completion"][0]["content"] == "Yes" for row in walkthrough
    )  # every walkthrough step changes the world
    data = collect_trajectories(random_policy(seed=0), games, episodes_per_game=3, max_steps=6)
    rows = actionability_rows(data)
    labels = {row["completion"][0]["content"] for row in rows}
    assert labels == {"Yes", "No"} and all(
        row["prompt"][0]["content"].endswith(ACTIONABILITY_QUESTION) for row in rows
    )
    looks = [
        row
        for row in rows
        if row["prompt"][0]["content"].split("Action: ")[-1].startswith(("look", "inventory", "examine"))
    ]
    assert all(row["completion"][0]["content"] == "No" for row in looks)


def test_actor_examples_longer_than_max_length_are_refused_not_dropped(tiny_model_and_tokenizer):
    from llmq.envs.textworld import policy_example, render_state
    from llmq.errors import UserError
    from llmq.methods.digiq import check_actor_lengths

    _, tokenizer = tiny_model_and_tokenizer
    rows = [policy_example(render_state("eat the apple", [], "A long room. " * 40), ["take apple"], "take apple")]
    check_actor_lengths(tokenizer, rows, 4096)
    with pytest.raises(UserError, match="1 of 1 actor examples are longer than 256 tokens"):
        check_actor_lengths(tokenizer, rows, 256)
