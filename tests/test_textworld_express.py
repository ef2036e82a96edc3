"""TextWorldExpress (CookingWorld, TextWorld Commonsense, Coin Collector) behind llmq's text-game interface, on the
benchmark's own folds."""

import json
import shutil

import pytest

pytest.importorskip("textworld", reason="TextWorld is not installed (the agents extra: pip install 'llmq[agents]')")
pytest.importorskip(
    "textworld_express", reason="TextWorldExpress is not installed (the agents extra: pip install 'llmq[agents]')"
)
if shutil.which("java") is None:
    pytest.skip(
        "TextWorldExpress needs a Java runtime on PATH (e.g. openjdk-17-jre-headless)", allow_module_level=True
    )

from llmq.envs.textworld import (  # noqa: E402
    INVALID_FEEDBACK,
    collect_trajectories,
    evaluate_agent,
    random_policy,
    walkthrough_policy,
)
from llmq.envs.textworld_express import JAVA_MISSING, TextWorldExpressGame, fold_games  # noqa: E402

# One room and few objects: the smallest games of each benchmark.
PARAMS = {
    "cookingworld": "numLocations=1,numIngredients=2,numDistractorItems=2,includeDoors=0,limitInventorySize=0",
    "twc": "numLocations=1,numItemsToPutAway=1,includeDoors=0,limitInventorySize=0",
    "coin": "numLocations=1,numDistractorItems=0,includeDoors=0",
}


@pytest.mark.parametrize("game", sorted(PARAMS))
def test_the_gold_path_wins_every_test_game_and_rewards_sum_to_the_normalised_score(game):
    games = fold_games(game, "test", count=2, params=PARAMS[game])
    for spec in games:
        with spec.open(max_steps=30) as env:
            observation = env.reset()
            assert env.walkthrough and observation.score == 0 and observation.max_score == 1
            assert observation.goal and observation.text in observation.state
            total = 0.0
            for command in env.walkthrough:
                assert command in observation.admissible
                observation, reward, done, info = env.step(command)
                total += reward
                assert info["valid"] and not info["truncated"]
            assert done and observation.won and total == pytest.approx(1.0)
    report = evaluate_agent(walkthrough_policy(games), games, max_steps=30)
    assert report["success_rate"] == report["normalized_score"] == 1.0
    assert report["normalized_score_ci95"][0] < 1.0 == report["normalized_score_ci95"][1]  # never zero-width


def test_folds_are_the_benchmarks_disjoint_seeds_and_a_game_replays_identically():
    folds = {fold: fold_games("coin", fold, count=3, params=PARAMS["coin"]) for fold in ("train", "dev", "test")}
    seeds = {fold: {game.seed for game in games} for fold, games in folds.items()}
    assert not (seeds["train"] & seeds["test"]) and not (seeds["dev"] & seeds["test"])
    first, again = folds["test"][0].open(5), folds["test"][0].open(5)
    try:
        assert first.reset() == again.reset()
        assert folds["test"][0].name == f"twx-coin-test-s{folds['test'][0].seed}"
    finally:
        first.close(), again.close()
    with pytest.raises(ValueError, match="has 1000 games"):
        fold_games("coin", "test", count=2, offset=999)
    with pytest.raises(ValueError, match="not one of"):
        TextWorldExpressGame("zork", "test", 0)


def test_free_text_is_matched_an_invalid_one_wastes_a_step_and_the_step_limit_ends_the_episode():
    [game] = fold_games("twc", "train", count=1, params=PARAMS["twc"])
    with game.open(max_steps=2) as env:
        start = env.reset()
        observation, reward, done, info = env.step("please juggle the moon")
        assert (reward, done, info) == (0.0, False, {"valid": False, "command": None, "truncated": False})
        assert observation.text.startswith(INVALID_FEEDBACK) and observation.admissible == start.admissible
        observation, reward, done, info = env.step("Look around.")
        assert info == {"valid": True, "command": "look around", "truncated": True} and done


def test_collected_rows_name_their_games(tmp_path):
    games = fold_games("cookingworld", "train", count=2, params=PARAMS["cookingworld"])
    data = collect_trajectories(random_policy(seed=0), games, episodes_per_game=2, max_steps=4)
    assert set(data["game"]) == {game.name for game in games} and len(data) == 16
    assert all(row["done"] for row in data if row["step"] == 3)  # the step limit ends every episode


def test_a_missing_java_is_one_clear_error(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(RuntimeError, match="Java runtime"):
        fold_games("coin", "test", count=1)
    assert "apt-get install" in JAVA_MISSING


@pytest.mark.slow
def test_llmq_train_digiq_runs_on_a_textworld_express_benchmark(tmp_path, tiny_model_dir):
    import datasets

    from llmq.cli import main

    out = tmp_path / "digiq"
    argv = ["train", "--method", "digiq", "--model_name_or_path", "tiny-llama", "--output_dir", str(out)]
    argv += ["--benchmark", "coin", "--game_params", PARAMS["coin"], "--train_games", "2", "--test_games", "2"]
    argv += ["--episode_steps", "3", "--episodes_per_game", "1", "--critic_steps", "10", "--critic_batch_size", "4"]
    # the tiny model's byte tokenizer makes a TextWorldExpress prompt about 1,200 tokens long
    argv += ["--critic_hidden_size", "16", "--threshold", "-1000", "--max_steps", "2", "--max_length", "4096"]
    argv += ["--per_device_train_batch_size", "2", "--report_to", "none", "--save_strategy", "no", "--use_cpu", "true"]
    assert main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["benchmark"] == "coin" and summary["test_games"] == 2
    assert {game["game"] for game in summary["after"]["games"]} == {
        game.name for game in fold_games("coin", "test", count=2, params=PARAMS["coin"])
    }
    assert set(datasets.load_from_disk(str(out / "trajectories"))["game"]) == {
        game.name for game in fold_games("coin", "train", count=2, params=PARAMS["coin"])
    }


def test_a_misspelt_benchmark_is_one_line_and_exit_2(tmp_path, capsys):
    from llmq.cli import main

    argv = ["train", "--method", "digiq", "--model_name_or_path", "tiny-llama", "--output_dir", str(tmp_path)]
    assert main([*argv, "--benchmark", "coins"]) == 2
    assert "key 'benchmark': 'coins' is not one of textworld, cookingworld, twc, coin" in capsys.readouterr().err
    assert main([*argv, "--game_params", "numLocations=1"]) == 2
    assert "key 'game_params'" in capsys.readouterr().err


def test_the_walkthrough_policy_refuses_games_it_cannot_tell_apart():
    """Coin Collector's start room does not show where the coin is: two games can share a state and need different
    commands there.  TextWorldExpress's gold path of one game can differ between runs (seen: 'look around, move north,
    take coin', and a detour west and east first), so a fixed pair of games conflicts only in most runs (10 games
    once gave none); among 40, several pairs share their start room."""
    games = fold_games("coin", "dev", count=40, params="numLocations=4,numDistractorItems=0,includeDoors=0")
    with pytest.raises(ValueError, match="cannot tell them apart"):
        walkthrough_policy(games)
