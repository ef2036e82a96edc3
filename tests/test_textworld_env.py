"""TextWorld benchmark on real generated games: generation, env, free-text matching, collection, evaluation."""

import json

import pytest

pytest.importorskip("textworld", reason="TextWorld is not installed (the agents extra: pip install 'llmq[agents]')")

from llmq.envs.textworld import (  # noqa: E402  (after the skip: the module needs TextWorld)
    INVALID_FEEDBACK,
    TextWorldEnv,
    collect_trajectories,
    evaluate_agent,
    llm_policy,
    make_games,
    match_command,
    random_policy,
    walkthrough_policy,
)
from llmq.rollout import HFEngine, SamplingParams  # noqa: E402

# One room, three objects, two-step quests: the smallest games with something to plan.
SETTINGS = dict(rooms=1, nb_objects=3, quest_length=2)


@pytest.fixture(scope="module")
def games(tmp_path_factory):
    return make_games(tmp_path_factory.mktemp("games"), count=3, seed=0, **SETTINGS)


def test_generation_is_deterministic_and_idempotent(games, tmp_path):
    again = make_games(tmp_path, count=2, seed=0, **SETTINGS)
    for ours, theirs in zip(games, again):
        assert ours.name == theirs.name
        # The story file embeds its compile date, so the games are compared by their metadata.
        assert json.loads(ours.with_suffix(".json").read_text()) == json.loads(theirs.with_suffix(".json").read_text())
        with TextWorldEnv(ours, 5) as first, TextWorldEnv(theirs, 5) as second:
            assert first.reset() == second.reset()
    stamps = {path: path.stat().st_mtime_ns for path in tmp_path.iterdir()}
    assert make_games(tmp_path, count=2, seed=0, **SETTINGS) == again
    assert {path: path.stat().st_mtime_ns for path in tmp_path.iterdir()} == stamps
    assert sorted(path.suffix for path in tmp_path.iterdir()) == [".json", ".json", ".z8", ".z8"]  # no scratch left
    assert make_games(tmp_path, count=1, seed=5, **SETTINGS)[0].name == "tw-w1-o3-q2-s5.z8"


def test_the_walkthrough_wins_every_game_and_the_rewards_sum_to_the_score(games):
    for game in games:
        with TextWorldEnv(game, max_steps=20) as env:
            observation = env.reset()
            assert env.walkthrough and observation.score == 0 and observation.max_score >= 1
            assert observation.goal and observation.text in observation.state
            total, done = 0.0, False
            for number, command in enumerate(env.walkthrough, start=1):
                assert command in observation.admissible
                assert not done
                observation, reward, done, info = env.step(command)
                total += reward
                assert info == {"valid": True, "command": command, "truncated": False}
                assert observation.steps == number
            assert done and observation.won and not observation.lost
            assert total == observation.score == observation.max_score
            assert observation.history == tuple(env.walkthrough)
    report = evaluate_agent(walkthrough_policy(games), games, max_steps=10)
    assert report["success_rate"] == report["normalized_score"] == 1.0
    assert report["invalid_action_rate"] == 0.0


def test_an_invalid_free_text_action_wastes_a_step_with_feedback(games):
    with TextWorldEnv(games[0], max_steps=2) as env:
        start = env.reset()
        observation, reward, done, info = env.step("Dance with the moon, then sing!")
        assert (reward, done, info) == (0.0, False, {"valid": False, "command": None, "truncated": False})
        assert observation.text.startswith(INVALID_FEEDBACK)
        assert observation.history == ("Dance with the moon, then sing! (invalid)",)
        assert (observation.steps, observation.score, observation.admissible) == (1, 0, start.admissible)
        observation, reward, done, info = env.step("")
        assert done and info["truncated"] and not observation.won
        with pytest.raises(RuntimeError, match="call reset"):
            env.step(env.walkthrough[0])
        assert env.reset() == start  # a new episode starts from scratch


def test_match_command():
    admissible = ["close safe", "take type H latchkey", "take key", "take key from box", "look", "open box"]
    assert match_command("close safe", admissible) == "close safe"
    assert match_command("  Close   the SAFE! ", admissible) == "close safe"
    assert match_command("take type-h latchkey.", admissible) == "take type H latchkey"
    assert match_command("> I will open the box now", admissible) == "open box"
    assert match_command("Command: take the key from the box", admissible) == "take key from box"  # over "take key"
    assert match_command("take key", admissible) == "take key"
    assert match_command("open box, then look", admissible) is None  # two commands
    assert match_command("reopen boxes", admissible) is None  # whole words only
    assert match_command("xyzzy plugh", admissible) is None
    assert match_command("?!", admissible) is None
    assert match_command("look", []) is None


def test_collect_trajectories_schema_returns_and_episode_ends(games):
    gamma, max_steps = 0.9, 6
    data = collect_trajectories(
        random_policy(seed=1), games, episodes_per_game=2, max_steps=max_steps, seed=0, gamma=gamma
    )
    assert data.column_names == [
        "game",
        "episode",
        "step",
        "state",
        "action",
        "valid",
        "reward",
        "next_state",
        "done",
        "truncated",
        "won",
        "mc_return",
        "admissible",
    ]
    rows = data.to_list()
    episodes: dict[tuple, list[dict]] = {}
    for row in rows:
        episodes.setdefault((row["game"], row["episode"]), []).append(row)
    assert sorted(episodes) == sorted((game.stem, episode) for game in games for episode in range(2))
    for steps in episodes.values():
        assert [row["step"] for row in steps] == list(range(len(steps)))
        assert 1 <= len(steps) <= max_steps
        assert [row["done"] for row in steps] == [False] * (len(steps) - 1) + [True]
        won = steps[-1]["reward"] > 0
        assert all(row["won"] == won for row in steps)
        if won:
            assert not steps[-1]["truncated"]
        else:
            assert steps[-1]["truncated"] and len(steps) == max_steps
        for t, row in enumerate(steps):
            assert row["valid"] and row["action"] in row["admissible"]
            assert row["mc_return"] == pytest.approx(
                sum(gamma**k * later["reward"] for k, later in enumerate(steps[t:]))
            )
            assert row["state"].startswith("Goal: ")
            if t + 1 < len(steps):
                assert row["next_state"] == steps[t + 1]["state"]
    assert (
        collect_trajectories(
            random_policy(seed=1), games, episodes_per_game=2, max_steps=max_steps, seed=0, gamma=gamma
        ).to_list()
        == rows
    )


def test_evaluate_agent_random_policy_below_the_walkthrough(games):
    report = evaluate_agent(random_policy(seed=0), games, max_steps=4)
    # Seeded: the random policy wins none of these games within 4 steps.
    assert report["success_rate"] < 1.0
    assert report["episodes"] == len(report["games"]) == 3
    low, high = report["success_rate_ci95"]
    assert 0.0 <= low <= report["success_rate"] <= high <= 1.0
    assert all(
        game["steps"] <= 4 and game["normalized_score"] == game["score"] / game["max_score"]
        for game in report["games"]
    )


def test_llm_policy_runs_end_to_end_and_its_invalid_actions_are_handled(games, tiny_model_and_tokenizer):
    model, tokenizer = tiny_model_and_tokenizer
    policy = llm_policy(HFEngine(model, tokenizer, progress=False), SamplingParams(max_new_tokens=8, temperature=1.0))
    data = collect_trajectories(policy, games[:1], episodes_per_game=1, max_steps=2)
    rows = data.to_list()
    assert [row["step"] for row in rows] == [0, 1] and rows[-1]["done"]
    for row in rows:
        assert row["valid"] == (row["action"] in row["admissible"])
        if not row["valid"]:
            assert INVALID_FEEDBACK in row["next_state"] and "(invalid)" in row["next_state"]
