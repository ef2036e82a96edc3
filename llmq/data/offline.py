"""Offline RL datasets: scored samples read back from disk or the Hub, and preference pairs built from them."""

from __future__ import annotations

from pathlib import Path

import datasets

from llmq.errors import UserError


def mixed_reward_groups(scored):
    """The rows of the questions whose completions do not all have the same reward.

    A question where every sample is wrong (or every one right) holds no contrast between its
    answers: under ShiQ its rows only hold the policy at the reference.  Dropping them spends the
    training compute on the questions that tell right from wrong (DAPO's dynamic sampling keeps the
    same groups).
    """
    if "question_index" not in scored.column_names:
        raise UserError("the training data have no 'question_index' column: samples cannot be grouped by question")
    questions = scored["question_index"]  # one read of the column (a copy out of Arrow), used twice
    rewards: dict[int, set[float]] = {}
    for question_index, reward in zip(questions, scored["reward"], strict=True):
        rewards.setdefault(question_index, set()).add(reward)
    keep = [row for row, question_index in enumerate(questions) if len(rewards[question_index]) > 1]
    if not keep:
        raise UserError(
            "no question has completions with different rewards: there is nothing to contrast (sample more "
            "completions or questions)"
        )
    return scored.select(keep)


def preference_pairs(scored):
    """Best vs worst completion of each question (``prompt``, ``chosen``, ``rejected``, both rewards).

    Questions whose completions all have the same reward carry no preference and are dropped.
    Both responses start from the same prompt and end in terminal states, as DPO's Bradley–Terry
    model requires (§3.3).
    """
    groups: dict[int, list[dict]] = {}
    for row in scored:
        groups.setdefault(row["question_index"], []).append(row)
    pairs = []
    for question_index, rows in groups.items():
        best = max(rows, key=lambda row: row["reward"])
        worst = min(rows, key=lambda row: row["reward"])
        if best["reward"] > worst["reward"]:
            pairs.append(
                {
                    "prompt": best["prompt"],
                    "chosen": best["completion"],
                    "rejected": worst["completion"],
                    "chosen_reward": best["reward"],
                    "rejected_reward": worst["reward"],
                    "question_index": question_index,
                }
            )
    if not pairs:
        raise UserError(
            "no question has completions with different rewards: there is no preference to learn (sample more "
            "completions or questions)"
        )
    return datasets.Dataset.from_list(pairs)


def load_training_dataset(path: str):
    """A dataset saved by ``llmq generate`` / ``save_to_disk``, a ``.jsonl``/``.json`` file, or a Hub id."""
    location = Path(path)
    if location.is_dir():
        try:
            return datasets.load_from_disk(str(location))
        except FileNotFoundError:
            raise UserError(f"dataset_path '{path}' is a folder but not a saved HF dataset") from None
    if location.suffix in (".jsonl", ".json"):
        if not location.is_file():
            raise UserError(f"dataset_path '{path}' does not exist")
        return datasets.Dataset.from_json(str(location))
    if location.exists() or path.startswith((".", "/")) or "/" not in path:
        raise UserError(f"dataset_path '{path}' is neither a saved dataset folder, a .jsonl/.json file, nor a Hub id")
    return datasets.load_dataset(path, split="train")
