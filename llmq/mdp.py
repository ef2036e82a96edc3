"""Tensor primitives of the token MDP (docs/algorithms.md §1.1, §7.2).

Every per-token tensor in llmq is aligned with ``input_ids``: position ``p`` holds the quantity
for the action ``input_ids[:, p]`` taken in the state ``input_ids[:, :p]``.  A causal LM scores
token ``p`` in logits row ``p - 1``; :func:`token_logprobs` is the one place that does that shift.
Position 0 is never an action (it has no state before it) and is filled with zeros.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def token_logprobs(logits: torch.Tensor, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities of the taken tokens and the log-sum-exp of the logits, in fp32.

    Args:
        logits: ``[B, L, V]`` logits in the HF convention (row ``p - 1`` scores token ``p``).
        input_ids: ``[B, L]`` token ids.

    Returns:
        ``(logp, lse)``, both ``[B, L]`` in fp32 (fp64 for fp64 logits): ``logp[:, p] = log π(input_ids[:, p] |
        input_ids[:, :p])``
        and ``lse[:, p] = LSE ℓ(s_p)`` over the full vocabulary; column 0 is 0 in both.
    """
    if logits.dim() != 3 or input_ids.shape != logits.shape[:2]:
        raise ValueError(
            f"logits {tuple(logits.shape)} and input_ids {tuple(input_ids.shape)} do not align as [B, L, V] / [B, L]"
        )
    scores = logits[:, :-1]
    scores = scores.to(torch.promote_types(scores.dtype, torch.float32))  # bf16/fp16 → fp32; fp64 stays
    lse = torch.logsumexp(scores, dim=-1)
    taken = scores.gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    pad = lse.new_zeros(lse.shape[0], 1)
    return torch.cat([pad, taken - lse], dim=1), torch.cat([pad, lse], dim=1)


def state_scores(logits: torch.Tensor) -> torch.Tensor:
    """Logits ``[B, L, V]`` re-aligned so that row ``p`` scores the actions of state ``input_ids[:, :p]``.

    The shift of :func:`token_logprobs`, kept for the whole vocabulary (row 0 is zeros), in fp32
    or wider.  It copies the logits, so training losses use :func:`token_logprobs` instead; the
    Q-function views and decoders, which need every token's score, use this.
    """
    scores = logits[:, :-1].to(torch.promote_types(logits.dtype, torch.float32))
    return torch.cat([scores.new_zeros(scores.shape[0], 1, scores.shape[2]), scores], dim=1)


def action_mask_from_spans(spans: Sequence[Sequence[tuple[int, int]]], seq_len: int) -> torch.Tensor:
    """Action mask ``[B, seq_len]`` (bool) that is 1 on the half-open token spans ``[start, end)``.

    A single-turn row has one span (the completion); a multi-turn row has one span per agent
    turn, and the tool/user/environment tokens between them stay 0 (they are observations).
    """
    mask = torch.zeros(len(spans), seq_len, dtype=torch.bool)
    for row, row_spans in enumerate(spans):
        for start, end in row_spans:
            if not 0 < start <= end <= seq_len:
                raise ValueError(
                    f"row {row}: action span ({start}, {end}) is outside 1..{seq_len} (position 0 cannot be an action)"
                )
            mask[row, start:end] = True
    return mask


def completion_mask(attention_mask: torch.Tensor, completion_start: torch.Tensor) -> torch.Tensor:
    """Single-turn action mask: real tokens at positions ``>= completion_start[b]`` (works with left or right
    padding)."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (positions[None, :] >= completion_start[:, None]) & attention_mask.bool()


def last_action_positions(act_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last action token of each row ``[B]``; -1 for a row without actions."""
    positions = torch.arange(act_mask.shape[1], device=act_mask.device).expand_as(act_mask)
    return torch.where(act_mask.bool(), positions, -1).amax(dim=1)


def sequence_rewards_to_tokens(rewards: torch.Tensor, act_mask: torch.Tensor) -> torch.Tensor:
    """Place one reward per row on its last action token (docs/algorithms.md §1.1), zeros elsewhere."""
    last = last_action_positions(act_mask)
    if (last < 0).any():
        raise ValueError(
            f"rows {torch.nonzero(last < 0).flatten().tolist()} have no action token to carry their reward"
        )
    token_rewards = torch.zeros(act_mask.shape, dtype=torch.float32, device=act_mask.device)
    token_rewards[torch.arange(act_mask.shape[0], device=act_mask.device), last] = rewards.float()
    return token_rewards


def reverse_discounted_cumsum(values: torch.Tensor, gamma: float, act_mask: torch.Tensor) -> torch.Tensor:
    """``out[:, t] = Σ_{k ≥ t, k action} γ^{n(t, k)} values[:, k]`` where ``n`` counts action tokens only.

    The discount advances on action tokens alone, so observation tokens between agent turns do
    not consume γ, and their ``values`` are ignored.  At an observation position the result
    equals the one at the next action position.
    """
    mask = act_mask.bool()
    masked = torch.where(mask, values, torch.zeros_like(values))
    if gamma == 1.0:
        return masked.flip(1).cumsum(1).flip(1)
    out = torch.empty_like(masked)
    running = torch.zeros_like(masked[:, 0])
    for p in range(masked.shape[1] - 1, -1, -1):
        running = torch.where(mask[:, p], masked[:, p] + gamma * running, running)
        out[:, p] = running
    return out
