"""Pure loss functions: tensors in, ``(loss, metrics)`` out — no model, no I/O.

They work on a transformer's logits and on a tabular "LM" (``llmq.testing``) alike, which is how
the oracle tests prove their fixed points.  Sections (§) and equation labels refer to
``docs/algorithms.md``.  Metrics are detached 0-dim tensors: reading them never waits for the
device inside a training step; the trainers average them (across processes) when they log.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from llmq.mdp import action_logit_rows, last_action_positions, reverse_discounted_cumsum, token_logprobs


def _next_action_values(values: torch.Tensor, act_mask: torch.Tensor) -> torch.Tensor:
    """``values`` at the next action position after each position (0 where there is none)."""
    length = act_mask.shape[1]
    positions = torch.arange(length, device=act_mask.device).expand_as(act_mask)
    action_positions = torch.where(act_mask, positions, length)
    # Reverse running minimum of action positions strictly after p.
    after = torch.cat([action_positions[:, 1:], action_positions.new_full((act_mask.shape[0], 1), length)], dim=1)
    next_position = after.flip(1).cummin(1).values.flip(1)
    gathered = values.gather(1, next_position.clamp(max=length - 1))
    return torch.where(next_position < length, gathered, torch.zeros_like(gathered))


def shiq_loss(
    logits: torch.Tensor,
    ref_logits: torch.Tensor | None = None,
    *,
    input_ids: torch.Tensor,
    act_mask: torch.Tensor,
    rewards: torch.Tensor,
    beta: float,
    gamma: float = 1.0,
    ref_logp: torch.Tensor | None = None,
    ref_lse: torch.Tensor | None = None,
    truncated: torch.Tensor | None = None,
    loss_type: Literal["multistep", "one_step"] = "multistep",
    q_model: bool = False,
    logit_rows: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """ShiQ: squared Bellman residuals on the LM's own logits (docs/algorithms.md §2.3–2.4).

    With ``ρ = log π_θ − log π_ref`` and the logit value shift ``u = LSE ℓ_θ − LSE ℓ_ref``, the
    multi-step residual at every action token ``t`` of a trajectory is (S3)

        δ_t = β·u(s_t) + β·Σ_{k≥t} γ^{k−t} ρ(s_k, a_k) − Σ_{k≥t} γ^{k−t} r_k

    and the loss is the mean of ``δ_t²`` over action tokens.  Its zero is the KL-regularised
    optimum: ``ℓ_θ − ℓ_ref = Q*/β`` and ``π_θ = π*``, provided transitions are deterministic: with
    random observations (a stochastic tool or user) a squared sampled residual is biased, its
    minimum is not zero and its minimiser is not exactly π* (fine for near-deterministic tools).
    ``loss_type="one_step"`` uses (S2) instead:
    ``δ_t = β·ρ_t + β·u(s_t) − r_t − γ·β·sg[u(s_{t+1})]`` with ``s_{t+1}`` the next agent state.

    Args:
        logits: ``[B, L, V]`` policy logits, HF convention (row ``p − 1`` scores token ``p``).
        ref_logits: ``[B, L, V]`` reference logits; or pass ``ref_logp`` and ``ref_lse`` instead.
        input_ids: ``[B, L]`` tokens of the trajectories.
        act_mask: ``[B, L]`` 1 on agent action tokens only (prompt, observations, padding are 0).
        rewards: ``[B, L]`` reward on the token that earns it (a sequence reward on the last action).
        beta: KL temperature β > 0.
        gamma: discount, advanced on action tokens only.
        ref_logp, ref_lse: ``[B, L]`` precomputed ``log π_ref(a_p | s_p)`` and ``LSE ℓ_ref(s_p)``
            aligned like :func:`llmq.mdp.token_logprobs` (fp32).
        truncated: ``[B]`` bool, rows cut before a terminal state.  Their residuals bootstrap with
            ``γ^{T−t+1}·β·u(s_{T+1})`` read at the position after the last action (which must
            exist: pad such rows by one token), under stop-gradient.
        loss_type: ``"multistep"`` (S3, default) or ``"one_step"`` (S2).
        q_model: ``logits`` are a Q model's ``Q/β`` beside the reference (§6.6), not a policy's: the policy is
            ``ℓ_θ = ℓ_ref + logits``, so the fixed point puts ``Q*/β`` in its own logits; needs ``ref_logits``.
        logit_rows: ``[K]`` the rows of the full logits that ``logits`` and ``ref_logits`` hold, ``[B, K, V]``
            (:func:`llmq.mdp.action_logit_rows`: every action position and bootstrap state the loss reads).

    Returns:
        ``(loss, metrics)`` with metrics ``loss``, ``delta/abs_mean``, ``rho/mean``, ``u/mean``,
        ``kl`` (mean per-sequence Σρ on the data: a KL estimate when the data are on-policy),
        ``rewards`` (the per-sequence returns, ``[B]``; trainers log their ``rewards/mean`` and ``rewards/std``).
    """
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if loss_type not in ("multistep", "one_step"):
        raise ValueError(f"loss_type must be 'multistep' or 'one_step', got {loss_type!r}")
    if q_model:
        if ref_logits is None:
            raise ValueError("shiq_loss with q_model needs ref_logits: the policy is ℓ_ref + the model's Q/β")
        logits = ref_logits.detach() + logits  # ℓ_θ = ℓ_ref + Q/β (E5)
    logp, lse = token_logprobs(logits, input_ids, logit_rows)
    if ref_logits is not None:
        ref_logp, ref_lse = token_logprobs(ref_logits.detach(), input_ids, logit_rows)
    elif ref_logp is None or ref_lse is None:
        raise ValueError("shiq_loss needs ref_logits, or both ref_logp and ref_lse")
    mask = act_mask.bool()
    if logit_rows is not None:
        read = action_logit_rows(mask, truncated)
        missing = read[~torch.isin(read, logit_rows)]
        if len(missing):
            raise ValueError(f"logit_rows lack rows {missing.tolist()} that the loss reads")
    rewards = rewards.to(logp.dtype)
    u_all = lse - ref_lse  # the value shift of every state, action or not (used to bootstrap)
    rho = torch.where(mask, logp - ref_logp, 0.0)
    u = torch.where(mask, u_all, 0.0)

    last = last_action_positions(mask)
    bootstrap = torch.zeros_like(u_all[:, 0])
    if truncated is not None and truncated.any():
        after_last = last + 1
        if (after_last[truncated] >= u_all.shape[1]).any():
            raise ValueError(
                "a truncated row needs one position after its last action token (pad it) to read u(s_{T+1})"
            )
        bootstrap = torch.where(
            truncated, u_all.gather(1, after_last.clamp(max=u_all.shape[1] - 1)[:, None]).squeeze(1), 0.0
        ).detach()

    if loss_type == "multistep":
        returns = reverse_discounted_cumsum(rewards, gamma, mask)
        ratio_sums = reverse_discounted_cumsum(rho, gamma, mask)
        # Actions from t to T inclusive: the power of γ that carries the bootstrap back to t.
        remaining = reverse_discounted_cumsum(mask.float(), 1.0, mask)
        delta = beta * u + beta * ratio_sums - returns - gamma**remaining * beta * bootstrap[:, None]  # (S3)
    else:
        next_u = _next_action_values(u.detach(), mask)
        is_last = torch.arange(mask.shape[1], device=mask.device)[None, :] == last[:, None]
        next_u = torch.where(is_last, bootstrap[:, None], next_u)
        delta = beta * rho + beta * u - rewards - gamma * beta * next_u  # (S2)

    delta = torch.where(mask, delta, 0.0)
    count = mask.sum().clamp(min=1)
    loss = delta.pow(2).sum() / count

    with torch.no_grad():
        returns_per_row = torch.where(mask, rewards, 0.0).sum(1)
        metrics = {
            "loss": loss.detach(),
            "delta/abs_mean": delta.abs().sum() / count,
            "rho/mean": rho.sum() / count,
            "u/mean": u.sum() / count,
            "kl": rho.sum(1).mean(),
            "rewards": returns_per_row,
        }
    return loss, metrics


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float,
    label_smoothing: float | torch.Tensor = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Sigmoid DPO: Bradley–Terry maximum likelihood of the implicit reward (docs/algorithms.md §3.3).

    With the sequence-level implicit rewards ``r_w = β log π_θ(y^w|x)/π_ref(y^w|x)`` and
    ``r_l = β log π_θ(y^l|x)/π_ref(y^l|x)`` — each the sum over the response's action tokens of the
    token-level ``r_θ = β log π_θ/π_ref`` (R2), so ``V*(x)`` cancels between them — the loss is

        L_DPO = − E[ (1 − ε) log σ(r_w − r_l) + ε log σ(r_l − r_w) ]

    ``ε = 0`` is L_DPO of §3.3; ``ε > 0`` is conservative DPO: each label is flipped with
    probability ε.  A per-pair tensor ``ε = σ(R_l − R_w)`` turns the hard labels into the soft
    Bradley–Terry labels of a known reward, whose minimiser is exact (the population oracle).
    TRL 1.16's ``"sigmoid"`` loss ignores its ``label_smoothing``; at ``ε = 0`` the two agree.

    Args:
        policy_chosen_logps, policy_rejected_logps: ``[B]`` ``log π_θ(y|x)``, summed over the
            response's action tokens (prompt and padding excluded, EOS included when generated).
        ref_chosen_logps, ref_rejected_logps: ``[B]`` the same under π_ref.
        beta: KL temperature β > 0.
        label_smoothing: ε in [0, 1], a float or a ``[B]`` tensor.

    Returns:
        ``(loss, metrics)``: the mean over pairs, and the metrics under the names TRL's
        ``DPOTrainer`` logs: ``rewards/chosen``, ``rewards/rejected`` (mean ``r_w``, ``r_l``),
        ``rewards/accuracies`` (fraction with ``r_w > r_l``), ``rewards/margins`` (mean ``r_w − r_l``),
        ``logps/chosen``, ``logps/rejected`` (mean policy log-probs), plus ``loss``.
    """
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    smoothing = torch.as_tensor(label_smoothing, dtype=policy_chosen_logps.dtype, device=policy_chosen_logps.device)
    if (smoothing < 0).any() or (smoothing > 1).any():
        raise ValueError(f"label_smoothing must lie in [0, 1], got {label_smoothing}")
    chosen_rewards = beta * (policy_chosen_logps - ref_chosen_logps)
    rejected_rewards = beta * (policy_rejected_logps - ref_rejected_logps)
    margins = chosen_rewards - rejected_rewards
    loss = (-(1 - smoothing) * F.logsigmoid(margins) - smoothing * F.logsigmoid(-margins)).mean()  # L_DPO (§3.3)

    with torch.no_grad():
        metrics = {
            "loss": loss.detach(),
            "rewards/chosen": chosen_rewards.mean(),
            "rewards/rejected": rejected_rewards.mean(),
            "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
            "rewards/margins": margins.mean(),
            "logps/chosen": policy_chosen_logps.detach().mean(),
            "logps/rejected": policy_rejected_logps.detach().mean(),
        }
    return loss, metrics


def implicit_token_rewards(
    logp: torch.Tensor, ref_logp: torch.Tensor, act_mask: torch.Tensor, beta: float
) -> torch.Tensor:
    """Per-token implicit reward ``r_θ(s_t, a_t) = β(log π_θ(a_t|s_t) − log π_ref(a_t|s_t))`` (§3.5), ``[B, L]``.

    ``logp`` and ``ref_logp`` are aligned like :func:`llmq.mdp.token_logprobs`; the result is 0
    off ``act_mask`` (prompt, observations, padding).  For a DPO-trained policy it is the optimal
    soft advantage ``A*`` of the preference reward's class (E1), and its sum over a response is
    the sequence reward ``r_w`` of :func:`dpo_loss`: ``Σ_t r_θ = R(y) − V*(x)`` at the optimum (R2).
    """
    return torch.where(act_mask.bool(), beta * (logp - ref_logp), torch.zeros_like(logp))


def td_loss(
    q: torch.Tensor,
    v: torch.Tensor,
    *,
    target_q: torch.Tensor,
    target_v_next: torch.Tensor,
    rewards: torch.Tensor,
    dones: torch.Tensor,
    gamma: float,
    expectile: float | None = None,
    weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Digi-Q's critic loss (docs/algorithms.md §5.5): TD on the *logged* action, independent head chains.

    Every argument but the scalars is ``[H, B]`` (H heads, usually 2) or ``[B]``:

        y_Q,i = r + γ·(1 − done)·sg[V̄_i(s')]          Q_i(s, a) → y_Q,i
        y_V,i = sg[Q̄_i(s, a)]                         V_i(s)    → y_V,i

    with ``target_q`` = Q̄ (the target critic at the logged action) and ``target_v_next`` = V̄(s').
    Plain MSE makes (Q, V) the behaviour policy's values Q^{π_b}, V^{π_b} (SARSA-style fitted
    evaluation, §5.9); ``expectile`` τ ∈ (0.5, 1) weights V's residuals by |τ − 1[y_V < V]| (IQL),
    moving V towards the best logged actions.  ``weights`` ``[B]`` weight the transitions (e.g.
    exact behaviour probabilities in an oracle test); the loss is their weighted mean, summed over
    heads and over the Q and V terms.

    Returns the loss and metrics ``loss``, ``q/mean``, ``v/mean``, ``td_error/abs_mean`` (|y_Q − Q|).
    """
    if expectile is not None and not 0 < expectile < 1:
        raise ValueError(f"expectile must be in (0, 1), got {expectile}")
    weights = torch.ones_like(rewards) if weights is None else weights
    weights = weights / weights.sum()
    y_q = rewards + gamma * (1 - dones.to(rewards.dtype)) * target_v_next.detach()
    y_v = target_q.detach()
    q_error, v_error = y_q - q, y_v - v
    v_weight = (
        torch.ones_like(v_error) if expectile is None else torch.abs(expectile - (v_error < 0).to(v_error.dtype))
    )
    loss = (weights * q_error.pow(2)).sum() + (weights * v_weight * v_error.pow(2)).sum()
    metrics = {
        "loss": loss.detach(),
        "q/mean": (weights * q.detach()).sum(-1).mean(),
        "v/mean": (weights * v.detach()).sum(-1).mean(),
        "td_error/abs_mean": (weights * q_error.detach().abs()).sum(-1).mean(),
    }
    return loss, metrics


def best_of_n_advantages(
    q: torch.Tensor, v: torch.Tensor, *, threshold: float, valid: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Digi-Q's Best-of-N policy extraction (§5.6): which candidate action to imitate, and whether.

    ``q`` ``[H, B, N]`` are the heads' Q-values of N candidate actions per state, ``v`` ``[H, B]``
    the heads' state values.  ``A_j = max_i Q_i(s, a_j) − max_i V_i(s)`` (invalid candidates get
    ``A = 0``, as in the released code); the best candidate ``j* = argmax_j A_j`` is imitated
    when ``A_{j*} > threshold``.

    Returns ``(best [B] long, advantage [B], weight [B] ∈ {0, 1})``.
    """
    advantages = q.max(dim=0).values - v.max(dim=0).values[:, None]
    if valid is not None:
        advantages = torch.where(valid.bool(), advantages, torch.zeros_like(advantages))
    advantage, best = advantages.max(dim=-1)
    return best, advantage, (advantage > threshold).to(advantages.dtype)


def rollout_max_labels(step_rewards: list[float], continuation_returns: list[list[float]]) -> list[float]:
    """Q*'s rollout labels (§4.4 item 2): ``ŷ(s, a) = r(s, a) + max_n R(τ_n)`` over the returns of
    completions sampled from ``s ⊕ a`` (γ = 1); a Monte-Carlo lower estimate of ``Q_hard`` that
    tightens as N grows."""
    return [reward + max(returns) for reward, returns in zip(step_rewards, continuation_returns)]


def fqi_labels(step_rewards: list[float], dones: list[bool], next_q_values: list[list[float]]) -> list[float]:
    """Q*'s fitted-Q-iteration labels (§4.4 item 1): ``ŷ(s, a) = r(s, a) + max_c Q_prev(s', c)`` over
    candidate steps at ``s' = s ⊕ a`` (γ = 1; no bootstrap after a final step)."""
    return [
        reward + (0.0 if done else max(values)) for reward, done, values in zip(step_rewards, dones, next_q_values)
    ]
