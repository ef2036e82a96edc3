"""Exact oracles by backward dynamic programming over a :class:`~llmq.testing.TokenMDP` (docs/algorithms.md §8.1).

Everything is float64 numpy, keyed by state tuples.  Stochastic observation steps are handled
exactly: ``Q(s, a) = r(s, a) + γ Σ_{s'} P(s'|s, a) V(s')`` (B1).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from functools import cache

import numpy as np

from llmq.testing.mdp import Policy, State, TokenMDP


@dataclasses.dataclass(frozen=True)
class Values:
    """Action values ``q[s]`` ``[n_actions]``, state values ``v[s]`` and the policy ``pi[s]`` they belong to, per agent
    state."""

    q: dict[State, np.ndarray]
    v: dict[State, float]
    pi: dict[State, np.ndarray]


@dataclasses.dataclass(frozen=True)
class PolicySummary:
    """Policy-level quantities from the root, discounted by γ per agent token (§1.2).

    ``kl = E_π[Σ_t γ^t log π(a_t|s_t)/π_ref(a_t|s_t)]``, ``expected_return = E_π[Σ_t γ^t r_t]``,
    ``objective = expected_return − β·kl`` (J_β; for γ = 1 the sequence-level KL and E[R]).
    """

    kl: float
    expected_return: float
    objective: float


def _logsumexp(x: np.ndarray) -> float:
    return float(np.logaddexp.reduce(x))


def _backward(mdp: TokenMDP, backup: Callable[[State, np.ndarray], tuple[float, np.ndarray]]) -> Values:
    """The §8.1 loop; ``backup(s, q)`` returns ``(V(s), π(·|s))``."""
    q, v, pi = {}, {}, {}
    for s in mdp.states:
        qs = mdp.rewards[s].copy()
        for a in range(mdp.n_actions):
            for nxt, p in mdp.transitions(s, a):
                if not mdp.is_terminal(nxt):
                    qs[a] += mdp.gamma * p * v[nxt]
        q[s] = qs
        v[s], pi[s] = backup(s, qs)
    return Values(q, v, pi)


def soft_optimal(mdp: TokenMDP, beta: float) -> Values:
    """``Q*``, ``V*``, ``π*`` of the KL-regularised objective (B1–B3) at temperature ``beta``."""
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")

    def backup(s: State, qs: np.ndarray) -> tuple[float, np.ndarray]:
        log_ref = mdp.ref_log_probs(s)
        value = beta * _logsumexp(log_ref + qs / beta)  # (B2)
        return value, np.exp(log_ref + (qs - value) / beta)  # (B3)

    return _backward(mdp, backup)


def evaluate(mdp: TokenMDP, policy: Policy | None = None) -> Values:
    """``Q^π``, ``V^π`` of a policy (π_ref by default): the β → ∞ limit of ``Q*`` when π = π_ref (E7)."""
    policy = mdp.reference_policy if policy is None else policy
    return _backward(mdp, lambda s, qs: (float(policy[s] @ qs), np.asarray(policy[s], dtype=np.float64)))


def hard_optimal(mdp: TokenMDP) -> Values:
    """``Q_hard``: the unregularised optimum restricted to the support of π_ref, the β → 0 limit (E7).

    ``pi`` is greedy, split evenly between tied maximisers.
    """

    def backup(s: State, qs: np.ndarray) -> tuple[float, np.ndarray]:
        support = mdp.ref_logits[s] > -np.inf
        value = float(qs[support].max())
        greedy = support & np.isclose(qs, value, rtol=0, atol=1e-12)
        return value, greedy / greedy.sum()

    return _backward(mdp, backup)


def policy_summary(mdp: TokenMDP, policy: Policy, beta: float) -> PolicySummary:
    """KL to π_ref, expected return and objective J_β of ``policy``, by enumerating every trajectory."""
    kl = ret = 0.0
    for seq, prob in mdp.trajectories(policy):
        if prob == 0:
            continue
        for k, (s, a) in enumerate(mdp.steps(seq)):
            discount = mdp.gamma**k
            ret += prob * discount * mdp.rewards[s][a]
            kl += prob * discount * (np.log(policy[s][a]) - mdp.ref_log_probs(s)[a])
    return PolicySummary(kl=float(kl), expected_return=float(ret), objective=float(ret - beta * kl))


def exponential_utility_q(mdp: TokenMDP, beta: float) -> dict[State, np.ndarray]:
    """``β log E_{π_ref}[exp(G_t/β) | s_t, a_t]`` with ``G_t = Σ_{k≥t} γ^{k−t} r_k`` (E6, the Q♯ identity).

    Computed from the full return distribution under π_ref.  It equals ``Q*`` for deterministic
    transitions and γ = 1, and differs from it otherwise: that gap is what this function is for.
    """

    @cache
    def after_action(s: State, a: int) -> tuple[np.ndarray, np.ndarray]:
        """Log-probabilities and returns G_t of the completions after taking ``a`` in ``s``."""
        logps, returns = [], []
        for nxt, p in mdp.transitions(s, a):
            if mdp.is_terminal(nxt):
                logps.append(np.full(1, np.log(p)))
                returns.append(np.zeros(1))
                continue
            log_ref = mdp.ref_log_probs(nxt)
            for b in np.flatnonzero(log_ref > -np.inf):
                tail_logp, tail_returns = after_action(nxt, int(b))
                logps.append(np.log(p) + log_ref[b] + tail_logp)
                returns.append(mdp.gamma * tail_returns)
        return np.concatenate(logps), mdp.rewards[s][a] + np.concatenate(returns)

    return {
        s: np.array(
            [
                beta * _logsumexp(logp + returns / beta)
                for logp, returns in (after_action(s, a) for a in range(mdp.n_actions))
            ]
        )
        for s in mdp.states
    }
