"""Tensor primitives of the token MDP (docs/algorithms.md §1.1, §7.2).

Every per-token tensor in llmq is aligned with ``input_ids``: position ``p`` holds the quantity
for the action ``input_ids[:, p]`` taken in the state ``input_ids[:, :p]``.  A causal LM scores
token ``p`` in logits row ``p - 1``; :func:`token_logprobs` is the one place that does that shift.
Position 0 is never an action (it has no state before it) and is filled with zeros.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def token_logprobs(
    logits: torch.Tensor, input_ids: torch.Tensor, rows: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities of the taken tokens and the log-sum-exp of the logits, in fp32.

    Args:
        logits: ``[B, L, V]`` logits in the HF convention (row ``p - 1`` scores token ``p``); or, with ``rows``,
            only those rows of them, ``[B, K, V]`` (what a model returns for ``logits_to_keep=rows``).
        input_ids: ``[B, L]`` token ids.
        rows: ``[K]`` the logits rows that ``logits`` holds (see :func:`action_logit_rows`); ``None``: all.

    Returns:
        ``(logp, lse)``, both ``[B, L]`` in fp32 (fp64 for fp64 logits): ``logp[:, p] = log π(input_ids[:, p] |
        input_ids[:, :p])``
        and ``lse[:, p] = LSE ℓ(s_p)`` over the full vocabulary; column 0, and every position whose row is not in
        ``rows``, is 0 in both.
    """
    kept = input_ids.shape if rows is None else (input_ids.shape[0], len(rows))
    if logits.dim() != 3 or input_ids.dim() != 2 or logits.shape[:2] != kept:
        raise ValueError(
            f"logits {tuple(logits.shape)} and input_ids {tuple(input_ids.shape)} do not align as [B, L, V] / [B, L]"
            + ("" if rows is None else f" with {len(rows)} logits rows kept")
        )
    batch, length = input_ids.shape
    if rows is None:
        logits, rows = logits[:, :-1], torch.arange(length - 1, device=input_ids.device)
    scores = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16/fp16 → fp32; fp64 stays
    lse = torch.logsumexp(scores, dim=-1)
    positions = rows + 1
    taken = scores.gather(-1, input_ids[:, positions, None]).squeeze(-1)
    zeros = lse.new_zeros(batch, length)
    return zeros.index_copy(1, positions, taken - lse), zeros.index_copy(1, positions, lse)


def action_logit_rows(act_mask: torch.Tensor, truncated: torch.Tensor | None = None) -> torch.Tensor:
    """The logits rows a token-level loss reads, ``[K]`` ascending: row ``p − 1`` for every action position ``p`` of
    any row of the batch and, for a truncated row, the row of the state after its last action (its bootstrap).

    Given to a model as ``logits_to_keep``, they make it compute only those rows of its ``[B, L, V]`` logits: prompt
    and observation positions never reach the LM head, whose logits, their gradient and the log-sum-exp are each
    ``L × V`` floats per row.  The position after a truncated row's last action is clipped to the sequence (a loss
    that needs it there reports the missing padding).
    """
    scored = act_mask.bool().clone()
    if truncated is not None and truncated.any():
        after_last = (last_action_positions(scored) + 1).clamp(max=scored.shape[1] - 1)
        scored[truncated, after_last[truncated]] = True
    return torch.nonzero(scored[:, 1:].any(0)).squeeze(1)


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
