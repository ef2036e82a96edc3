"""Trajectories with rewards → the token-MDP batch schema (docs/algorithms.md §7.2).

Accepted rows (one dataset uses one format):

* standard: ``prompt`` (str), ``completion`` (str), and ``reward`` (float) or ``token_rewards``
  (one float per action token); optional ``truncated`` (bool: the completion was cut before it
  ended, so no EOS is appended and the loss bootstraps; conversational rows too).
* conversational: ``prompt`` and ``completion`` as lists of chat messages; the assistant messages
  of ``completion`` are the actions, everything in ``prompt`` is the state.
* multi-turn: ``messages`` (a list of chat messages) with ``turn_rewards`` (one float per assistant
  turn, placed on the turn's last token) or ``reward``; every assistant message is an action and
  user/tool/environment messages are observations, masked out of the loss.

An action turn covers the message content and the end-of-turn token that the chat template puts
after it; the template's own formatting around it (role headers, newlines) are observations.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from llmq.errors import UserError


def _number(value: Any, what: str, index: int) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise UserError(f"dataset row {index}: {what} must be a finite number, got {value!r}")
    return float(value)


def _chat_action_spans(
    tokenizer, messages: list[dict], action_turns: list[int], truncated: bool
) -> tuple[str, list[tuple[int, int]]]:
    """Render ``messages`` with the chat template and return the character span of each action turn.

    A turn starts where the template's generation prompt for it ends and stops after the end of
    the rendered turn, without trailing whitespace.  A truncated conversation ends with the raw
    content of its last (assistant) message: no end-of-turn token was generated.  This needs a
    template that renders a conversation prefix by prefix, which is checked.
    """
    render = tokenizer.apply_chat_template
    text = render(messages, tokenize=False)
    spans = []
    for turn in action_turns:
        before = render(messages[:turn], tokenize=False, add_generation_prompt=True)
        through = render(messages[: turn + 1], tokenize=False)
        if not (text.startswith(before) and text.startswith(through) and through.startswith(before)):
            raise UserError(
                "the chat template does not render conversations prefix by prefix; llmq cannot locate assistant "
                "turns with it"
            )
        spans.append((len(before), len(through.rstrip())))
    if truncated:
        start = spans[-1][0]
        text = text[:start] + messages[action_turns[-1]]["content"]
        spans[-1] = (start, len(text))
    return text, spans


def tokenize_trajectory(row: dict, tokenizer, max_length: int, index: int) -> dict[str, list]:
    """One dataset row → ``input_ids``, ``act_mask``, ``rewards`` (per token) and ``truncated``."""
    truncated = bool(row.get("truncated") or False)
    if "messages" in row:
        messages, action_turns = (
            row["messages"],
            [i for i, m in enumerate(row["messages"]) if m.get("role") == "assistant"],
        )
    elif isinstance(row.get("prompt"), list):
        messages = list(row["prompt"]) + list(row["completion"])
        action_turns = [i for i, m in enumerate(messages) if i >= len(row["prompt"]) and m.get("role") == "assistant"]
    else:
        messages = None
    if messages is None:
        prompt, completion = row.get("prompt"), row.get("completion")
        if not isinstance(prompt, str) or not prompt or not isinstance(completion, str):
            raise UserError(f"dataset row {index}: 'prompt' must be a non-empty string and 'completion' a string")
        if not completion.strip():
            raise UserError(f"dataset row {index}: the completion is empty")
        prompt_ids = tokenizer(prompt)["input_ids"]
        completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
        if not truncated:
            completion_ids = completion_ids + [tokenizer.eos_token_id]
        input_ids = prompt_ids + completion_ids
        act_mask = [0] * len(prompt_ids) + [1] * len(completion_ids)
        turn_ends = [len(input_ids) - 1]
    else:
        if not action_turns:
            raise UserError(f"dataset row {index}: no assistant message to learn from")
        empty = [turn for turn in action_turns if not str(messages[turn].get("content") or "").strip()]
        if empty:
            raise UserError(f"dataset row {index}: assistant message {empty[0]} is empty")
        if truncated and action_turns[-1] != len(messages) - 1:
            raise UserError(
                f"dataset row {index}: a truncated conversation must end with the assistant turn that was cut"
            )
        text, spans = _chat_action_spans(tokenizer, messages, action_turns, truncated)
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        input_ids = encoded["input_ids"]
        act_mask = [int(any(start <= first < end for start, end in spans)) for first, _ in encoded["offset_mapping"]]
        turn_ends = [
            max(p for p, (first, _) in enumerate(encoded["offset_mapping"]) if start <= first < end)
            for start, end in spans
        ]
    if not any(act_mask):
        raise UserError(f"dataset row {index}: the completion is empty")
    if act_mask[0]:
        raise UserError(f"dataset row {index}: the first token cannot be an action (the prompt is empty)")
    if len(input_ids) + 1 > max_length:
        raise UserError(
            f"dataset row {index}: {len(input_ids)} tokens exceed max_length={max_length} (raise max_length or drop "
            "the row)"
        )

    rewards = [0.0] * len(input_ids)
    actions = [p for p, a in enumerate(act_mask) if a]
    if row.get("token_rewards") is not None:
        values = row["token_rewards"]
        if not isinstance(values, list) or len(values) != len(actions):
            raise UserError(
                f"dataset row {index}: 'token_rewards' needs one number per action token ({len(actions)}), got "
                f"{len(values) if isinstance(values, list) else values!r}"
            )
        for position, value in zip(actions, values):
            rewards[position] = _number(value, "token_rewards", index)
    elif row.get("turn_rewards") is not None:
        values = row["turn_rewards"]
        if not isinstance(values, list) or len(values) != len(turn_ends):
            raise UserError(
                f"dataset row {index}: 'turn_rewards' needs one number per assistant turn ({len(turn_ends)}), got "
                f"{values!r}"
            )
        for position, value in zip(turn_ends, values):
            rewards[position] = _number(value, "turn_rewards", index)
    elif "reward" in row:
        rewards[turn_ends[-1]] = _number(row["reward"], "reward", index)
    else:
        raise UserError(f"dataset row {index}: needs 'reward', 'token_rewards' or 'turn_rewards'")
    return {"input_ids": input_ids, "act_mask": act_mask, "rewards": rewards, "truncated": truncated}


def sampled_trajectory(
    prompt_ids: list[int], completion_ids: list[int], reward: float, truncated: bool, max_length: int, index: int
) -> dict[str, list]:
    """A sampled answer as the engine generated it: the prompt's tokens (states), the answer's own tokens
    (actions, the end-of-turn token included when it was generated) and the reward on the last one.

    Unlike :func:`tokenize_trajectory` nothing is re-tokenized or appended, so the actions are exactly the
    sampled tokens and the sampler's log-probabilities line up with them.
    """
    if not completion_ids:
        raise UserError(f"sample {index}: the completion is empty")
    if len(prompt_ids) + len(completion_ids) + 1 > max_length:
        raise UserError(
            f"sample {index}: {len(prompt_ids) + len(completion_ids)} tokens exceed max_length={max_length} (raise "
            "max_length)"
        )
    rewards = [0.0] * (len(prompt_ids) + len(completion_ids))
    rewards[-1] = _number(reward, "reward", index)
    return {
        "input_ids": [*prompt_ids, *completion_ids],
        "act_mask": [0] * len(prompt_ids) + [1] * len(completion_ids),
        "rewards": rewards,
        "truncated": truncated,
    }


def length_ordered_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Row indices in batches of similar length, for passes whose order does not matter (reference
    statistics, scoring): padding costs what tokens cost, and random batches of sampled answers
    are about a third padding."""
    by_length = sorted(range(len(lengths)), key=lengths.__getitem__)
    return [by_length[start : start + batch_size] for start in range(0, len(by_length), batch_size)]


class TrajectoryCollator:
    """Right-pads tokenized trajectories into a batch, always with one extra padding column so the
    state after a truncated row's last action exists (its value bootstraps the loss)."""

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        length = max(len(row["input_ids"]) for row in rows) + 1

        def pad(key: str, value, dtype) -> torch.Tensor:
            return torch.tensor([list(row[key]) + [value] * (length - len(row[key])) for row in rows], dtype=dtype)

        batch = {
            "input_ids": pad("input_ids", self.pad_token_id, torch.long),
            "attention_mask": torch.tensor(
                [[1] * len(row["input_ids"]) + [0] * (length - len(row["input_ids"])) for row in rows]
            ),
            "act_mask": pad("act_mask", 0, torch.bool),
            "rewards": pad("rewards", 0.0, torch.float32),
            "truncated": torch.tensor([row["truncated"] for row in rows], dtype=torch.bool),
        }
        if "ref_logp" in rows[0]:
            batch["ref_logp"] = pad("ref_logp", 0.0, torch.float32)
            batch["ref_lse"] = pad("ref_lse", 0.0, torch.float32)
        return batch
