"""Finite token MDPs: the exact test bed of docs/algorithms.md §8 (notation of §1).

Token ids share one namespace, laid out as a causal LM would see them:

* ``0 .. n_actions - 1`` — the agent's action tokens (EOS is one of them); a Q-value or policy
  array over "the vocabulary" is indexed by these ids;
* ``n_actions`` — BOS, the prompt: sequence position 0, so the first action sits at position 1;
* ``n_actions + 1 ..`` — observation tokens, appended by the environment after some actions.
  They are part of the state but never actions.

A *state* is the tuple of token ids after BOS (the root is ``()``).  An agent state is a
non-terminal state in which the agent acts next; a prefix that ends with an action followed by
an observation step is not one (the environment moves).  The episode ends after EOS or after
``horizon`` agent tokens, and no observation follows the last action.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from functools import cached_property
from typing import Literal

import numpy as np
import torch

State = tuple[int, ...]
Policy = Mapping[State, np.ndarray]
"""Action probabilities ``[n_actions]`` per agent state."""


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    top = logits.max()
    return logits - (top + np.log(np.exp(logits - top).sum()))


def _frozen(values: Sequence[float], shape: tuple[int, ...], what: str) -> np.ndarray:
    array = np.array(values, dtype=np.float64)
    if array.shape != shape:
        raise ValueError(f"{what}: expected shape {shape}, got {array.shape}")
    array.setflags(write=False)
    return array


@dataclasses.dataclass(frozen=True, eq=False)
class TokenMDP:
    """A finite KL-regularised token MDP (docs/algorithms.md §1.1) with an optional stochastic environment.

    Attributes:
        actions: names of the action tokens; their ids are their indices.
        horizon: the episode ends after this many agent tokens (or after EOS).
        ref_logits: reference-policy *logits* ``[n_actions]`` per agent state.  They may carry any
            per-state offset ``c(s)``: ``π_ref = softmax(ref_logits[s])``.  ``-inf`` marks an action
            outside the support of π_ref.
        rewards: token-level reward ``r(s, ·)`` ``[n_actions]`` per agent state.
        gamma: discount, advanced on agent tokens only.
        observations: names of the observation tokens.
        obs_probs: for each prefix ``s ⊕ a`` after which the environment appends an observation,
            the distribution ``[n_observations]`` of that observation.
        eos: name of the action that ends the episode.
        bos: name of the prompt token at position 0.
    """

    actions: tuple[str, ...]
    horizon: int
    ref_logits: Mapping[State, np.ndarray]
    rewards: Mapping[State, np.ndarray]
    gamma: float = 1.0
    observations: tuple[str, ...] = ()
    obs_probs: Mapping[State, np.ndarray] = dataclasses.field(default_factory=dict)
    eos: str = "EOS"
    bos: str = "<bos>"

    def __post_init__(self) -> None:
        if self.eos not in self.actions:
            raise ValueError(f"eos {self.eos!r} is not one of the actions {self.actions}")
        if len(set(self.token_names)) != self.n_tokens:
            raise ValueError(f"token names must be distinct, got {self.token_names}")
        if self.horizon < 1:
            raise ValueError(f"horizon must be >= 1, got {self.horizon}")
        if not 0 < self.gamma <= 1:
            raise ValueError(f"gamma must be in (0, 1], got {self.gamma}")
        n, k = len(self.actions), len(self.observations)
        obs_probs = {tuple(key): _frozen(p, (k,), f"obs_probs[{key}]") for key, p in self.obs_probs.items()}
        for key, p in obs_probs.items():
            if (p < 0).any() or abs(p.sum() - 1) > 1e-9:
                raise ValueError(f"obs_probs[{key}] is not a distribution: {p}")
        object.__setattr__(self, "obs_probs", obs_probs)
        object.__setattr__(
            self, "ref_logits", {tuple(s): _frozen(v, (n,), f"ref_logits[{s}]") for s, v in self.ref_logits.items()}
        )
        object.__setattr__(
            self, "rewards", {tuple(s): _frozen(v, (n,), f"rewards[{s}]") for s, v in self.rewards.items()}
        )

        states = set(self.states)
        for table in ("ref_logits", "rewards"):
            keys = set(getattr(self, table))
            if keys != states:
                raise ValueError(
                    f"{table} must have exactly one entry per agent state; missing {sorted(states - keys)}, unknown "
                    f"{sorted(keys - states)}"
                )
        for s, logits in self.ref_logits.items():
            if np.isnan(logits).any() or (logits == np.inf).any() or (logits == -np.inf).all():
                raise ValueError(f"ref_logits[{s}] must be finite or -inf, with at least one finite entry: {logits}")
        for s, r in self.rewards.items():
            if not np.isfinite(r).all():
                raise ValueError(f"rewards[{s}] must be finite: {r}")
        reached = {s + (a,) for s in states for a in range(n)}
        for key in obs_probs:
            if key not in reached or self.is_terminal(key):
                raise ValueError(f"obs_probs key {key} is not a non-terminal prefix s ⊕ a of an agent state s")

    # --- tokens ---------------------------------------------------------------------------

    @property
    def n_actions(self) -> int:
        return len(self.actions)

    @property
    def n_tokens(self) -> int:
        """Size of the whole token namespace (actions, BOS, observations): the LM vocabulary."""
        return len(self.actions) + 1 + len(self.observations)

    @property
    def eos_id(self) -> int:
        return self.actions.index(self.eos)

    @property
    def bos_id(self) -> int:
        return len(self.actions)

    @property
    def token_names(self) -> tuple[str, ...]:
        return (*self.actions, self.bos, *self.observations)

    def encode(self, text: str) -> State:
        """State from whitespace-separated token names, e.g. ``"A B"`` → ``(0, 1)``; ``""`` is the root."""
        ids = {name: i for i, name in enumerate(self.token_names)}
        return tuple(ids[name] for name in text.split())

    def decode(self, state: Sequence[int]) -> str:
        return " ".join(self.token_names[t] for t in state)

    # --- dynamics -------------------------------------------------------------------------

    def is_terminal(self, seq: Sequence[int]) -> bool:
        """After EOS, or once ``horizon`` agent tokens have been emitted."""
        return len(seq) > 0 and (seq[-1] == self.eos_id or sum(t < self.n_actions for t in seq) >= self.horizon)

    def transitions(self, state: State, action: int) -> list[tuple[State, float]]:
        """``P(· | s, a)``: next states (agent states or terminal sequences) with their probabilities."""
        nxt = state + (action,)
        probs = self.obs_probs.get(nxt)
        if probs is None:
            return [(nxt, 1.0)]
        return [(nxt + (self.bos_id + 1 + o,), float(p)) for o, p in enumerate(probs) if p > 0]

    @cached_property
    def states(self) -> tuple[State, ...]:
        """Every agent (non-terminal) state, deepest first: the order of the backward DP (§8.1)."""
        found, frontier = [], [()]
        while frontier:
            state = frontier.pop()
            found.append(state)
            for a in range(self.n_actions):
                frontier.extend(s for s, _ in self.transitions(state, a) if not self.is_terminal(s))
        # A child is always longer than its parent.
        return tuple(sorted(found, key=lambda s: (-len(s), s)))

    @cached_property
    def state_index(self) -> dict[State, int]:
        """Row of each agent state in :attr:`states` (and in :class:`~llmq.testing.TabularLM`)."""
        return {s: i for i, s in enumerate(self.states)}

    def is_path(self, seq: Sequence[int]) -> bool:
        """Whether the dynamics can produce ``seq``: each action taken in an agent state, each observation where one
        follows."""
        seq = tuple(seq)
        for i, t in enumerate(seq):
            if t < self.n_actions:
                if seq[:i] not in self.state_index:
                    return False
            else:
                probs, o = self.obs_probs.get(seq[:i]), t - self.bos_id - 1
                if probs is None or not 0 <= o < len(probs) or probs[o] == 0:
                    return False
        return True

    def steps(self, seq: Sequence[int]) -> list[tuple[State, int]]:
        """The ``(agent state, action)`` pairs along a sequence (``seq[i]`` sits at batch position ``i + 1``, after
        BOS)."""
        seq = tuple(seq)
        return [(seq[:i], t) for i, t in enumerate(seq) if t < self.n_actions]

    # --- reference policy, rewards ----------------------------------------------------------

    def ref_log_probs(self, state: State) -> np.ndarray:
        """``log π_ref(· | s)`` (normalised, unlike :attr:`ref_logits`)."""
        return _log_softmax(self.ref_logits[state])

    @cached_property
    def reference_policy(self) -> dict[State, np.ndarray]:
        """π_ref as a :data:`Policy`."""
        return {s: np.exp(self.ref_log_probs(s)) for s in self.states}

    def collected_reward(self, seq: Sequence[int]) -> float:
        """``C(s)``: undiscounted reward collected inside the prefix (E8: ``Q*_seq = Q*_tok + C(s)`` for γ = 1)."""
        return float(sum(self.rewards[s][a] for s, a in self.steps(seq)))

    def trajectory_return(self, seq: Sequence[int]) -> float:
        """``Σ_k γ^k r_k`` over the agent tokens of ``seq``."""
        return float(sum(self.gamma**k * self.rewards[s][a] for k, (s, a) in enumerate(self.steps(seq))))

    def with_sequence_reward(self) -> TokenMDP:
        """The same MDP with each trajectory's whole (undiscounted) return on its last action (E8).

        Equivalent to the token-level placement for γ = 1 (same π*, Q* shifted by ``C(s)``); with
        γ < 1 moving reward changes its discount, so the two MDPs differ.
        """
        rewards = {}
        for s, r in self.rewards.items():
            ends = np.array([self.is_terminal(s + (a,)) for a in range(self.n_actions)])
            rewards[s] = np.where(ends, self.collected_reward(s) + r, 0.0)
        return dataclasses.replace(self, rewards=rewards)

    # --- trajectories -----------------------------------------------------------------------

    def trajectories(self, policy: Policy | None = None) -> list[tuple[State, float]]:
        """Every complete trajectory with its probability under ``policy`` (π_ref by default).

        All action sequences are listed (probability 0 where ``policy`` excludes them); observations
        of probability 0 are not.
        """
        policy = self.reference_policy if policy is None else policy
        found: list[tuple[State, float]] = []

        def walk(state: State, prob: float) -> None:
            for a in range(self.n_actions):
                for nxt, p in self.transitions(state, a):
                    if self.is_terminal(nxt):
                        found.append((nxt, prob * policy[state][a] * p))
                    else:
                        walk(nxt, prob * policy[state][a] * p)

        walk((), 1.0)
        return found

    def sample(self, policy: Policy, count: int, rng: np.random.Generator) -> list[State]:
        """``count`` complete trajectories drawn exactly from ``policy`` (and the observation distributions)."""
        sampled = []
        for _ in range(count):
            state: State = ()
            while not self.is_terminal(state):
                action = int(rng.choice(self.n_actions, p=policy[state]))
                successors = self.transitions(state, action)
                pick = rng.choice(len(successors), p=[p for _, p in successors]) if len(successors) > 1 else 0
                state = successors[pick][0]
            sampled.append(state)
        return sampled

    def trajectory_prob(self, seq: Sequence[int], policy: Policy | None = None) -> float:
        """Probability of generating the sequence (complete, or a prefix) under ``policy`` (π_ref by default)."""
        policy = self.reference_policy if policy is None else policy
        seq, prob = tuple(seq), 1.0
        for i, t in enumerate(seq):
            if t < self.n_actions:
                prob *= policy[seq[:i]][t]
            else:
                prob *= self.obs_probs[seq[:i]][t - self.bos_id - 1]
        return float(prob)


def toy_mdp(offset_seed: int | None = 0) -> TokenMDP:
    """The reference toy MDP of docs/algorithms.md §8.2.

    Actions ``A, B, EOS``; H = 3; π_ref depends on the last token only; reward 1 for an "AB"
    bigram (on the B); γ = 1.  The reference logits are ``log π_ref + c(s)`` with per-state
    offsets ``c(s) ~ U(-3, 3)`` drawn from ``offset_seed`` (``None``: normalised logits).
    """
    a, b = 0, 1
    ref = {None: [0.5, 0.3, 0.2], a: [0.2, 0.5, 0.3], b: [0.4, 0.2, 0.4]}
    states = [(), (a,), (b,), (a, a), (a, b), (b, a), (b, b)]
    rng = np.random.default_rng(offset_seed)
    ref_logits, rewards = {}, {}
    for s in states:
        offset = 0.0 if offset_seed is None else rng.uniform(-3, 3)
        ref_logits[s] = np.log(ref[s[-1] if s else None]) + offset
        rewards[s] = [0.0, 1.0 if s and s[-1] == a else 0.0, 0.0]
    return TokenMDP(actions=("A", "B", "EOS"), horizon=3, ref_logits=ref_logits, rewards=rewards)


def random_mdp(
    seed: int,
    vocab_size: int = 3,
    horizon: int = 3,
    gamma: float = 1.0,
    reward_placement: Literal["token", "sequence"] = "token",
    stochastic_obs: bool = False,
    *,
    n_observations: int = 2,
    obs_rate: float = 0.5,
    offset_scale: float = 3.0,
) -> TokenMDP:
    """A seeded random finite token MDP.

    Args:
        seed: seeds everything below.
        vocab_size: number of actions, EOS included (named ``t0, t1, …, EOS``).
        horizon: maximum number of agent tokens.
        gamma: discount.
        reward_placement: ``"token"``: an ``N(0, 1)`` reward on every (state, action);
            ``"sequence"``: an ``N(0, 1)`` reward on the actions that end the episode only.
        stochastic_obs: after each non-final action, with probability ``obs_rate``, the
            environment appends one of ``n_observations`` tokens (``o0, o1, …``) drawn from a
            random distribution.
        offset_scale: reference logits are ``N(0, 1)`` plus a per-state offset ``U(±offset_scale)``.
    """
    if vocab_size < 2:
        raise ValueError(f"vocab_size must be >= 2 (EOS and one more action), got {vocab_size}")
    if reward_placement not in ("token", "sequence"):
        raise ValueError(f"reward_placement must be 'token' or 'sequence', got {reward_placement!r}")
    rng = np.random.default_rng(seed)
    actions = (*(f"t{i}" for i in range(vocab_size - 1)), "EOS")
    observations = tuple(f"o{i}" for i in range(n_observations)) if stochastic_obs else ()
    eos, first_obs = vocab_size - 1, vocab_size + 1
    ref_logits, rewards, obs_probs = {}, {}, {}
    frontier: list[State] = [()]
    while frontier:
        state = frontier.pop(0)
        ref_logits[state] = rng.normal(size=vocab_size) + rng.uniform(-offset_scale, offset_scale)
        final = np.array([a == eos or sum(t < vocab_size for t in state) + 1 == horizon for a in range(vocab_size)])
        r = rng.normal(size=vocab_size)
        rewards[state] = r if reward_placement == "token" else np.where(final, r, 0.0)
        for a in np.flatnonzero(~final):
            nxt = state + (int(a),)
            if stochastic_obs and rng.uniform() < obs_rate:
                obs_probs[nxt] = rng.dirichlet(np.ones(n_observations))
                frontier.extend(nxt + (first_obs + o,) for o in range(n_observations))
            else:
                frontier.append(nxt)
    return TokenMDP(
        actions=actions,
        horizon=horizon,
        ref_logits=ref_logits,
        rewards=rewards,
        gamma=gamma,
        observations=observations,
        obs_probs=obs_probs,
    )


def make_batch(
    mdp: TokenMDP, sequences: Sequence[Sequence[int]] | None = None, policy: Policy | None = None
) -> dict[str, torch.Tensor]:
    """Sequences of the MDP in the llmq batch schema (docs/algorithms.md §7.2).

    Each row is BOS followed by the sequence, right-padded with EOS plus one extra padding column
    (like :class:`llmq.data.trajectories.TrajectoryCollator`), so that the state after a truncated
    row's last action has a position.

    Args:
        mdp: the MDP.
        sequences: complete trajectories or agent states (rows cut there are ``truncated``);
            default: every complete trajectory, in :meth:`TokenMDP.trajectories` order.
        policy: the policy whose probabilities become ``weights`` (π_ref by default).

    Returns:
        ``input_ids`` ``[B, L]`` long; ``attention_mask`` ``[B, L]`` long; ``act_mask`` ``[B, L]``
        bool (agent actions only: not BOS, observations or padding); ``rewards`` ``[B, L]`` fp32
        (``r(s_t, a_t)`` on the action that earns it, so a :meth:`~TokenMDP.with_sequence_reward`
        MDP puts the return on the last action); ``done`` ``[B, L]`` bool (the token that ends the
        episode); ``truncated`` ``[B]`` bool; ``ref_logp`` ``[B, L]`` fp32 (``log π_ref`` of each
        action, 0 elsewhere); ``ref_lse`` ``[B, L]`` fp32 (``LSE ℓ_ref(s_p)`` wherever the prefix
        before position ``p`` is an agent state, 0 elsewhere); ``weights`` ``[B]`` fp32 (sequence
        probabilities under ``policy``).
    """
    if sequences is None:
        sequences = [seq for seq, _ in mdp.trajectories()]
    sequences = [tuple(int(t) for t in seq) for seq in sequences]
    for seq in sequences:
        if not (mdp.is_path(seq) and (mdp.is_terminal(seq) or seq in mdp.state_index)):
            raise ValueError(
                f"{seq} ({mdp.decode(seq)!r}) is neither a complete trajectory nor an agent state of the MDP"
            )
    length = 2 + max(len(seq) for seq in sequences)
    shape = (len(sequences), length)
    input_ids = torch.full(shape, mdp.eos_id, dtype=torch.long)
    attention_mask = torch.zeros(shape, dtype=torch.long)
    act_mask = torch.zeros(shape, dtype=torch.bool)
    done = torch.zeros(shape, dtype=torch.bool)
    rewards, ref_logp, ref_lse = (torch.zeros(shape, dtype=torch.float32) for _ in range(3))
    for row, seq in enumerate(sequences):
        input_ids[row, : len(seq) + 1] = torch.tensor((mdp.bos_id, *seq))
        attention_mask[row, : len(seq) + 1] = 1
        done[row, len(seq)] = mdp.is_terminal(seq)
        for p in range(1, len(seq) + 2):
            state = seq[: p - 1]
            if state not in mdp.state_index:
                continue
            ref_lse[row, p] = float(np.logaddexp.reduce(mdp.ref_logits[state]))
            if p <= len(seq):
                action = seq[p - 1]
                act_mask[row, p] = True
                rewards[row, p] = float(mdp.rewards[state][action])
                ref_logp[row, p] = float(mdp.ref_log_probs(state)[action])
    weights = torch.tensor([mdp.trajectory_prob(seq, policy) for seq in sequences], dtype=torch.float32)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "act_mask": act_mask,
        "rewards": rewards,
        "done": done,
        "truncated": torch.tensor([not mdp.is_terminal(seq) for seq in sequences]),
        "ref_logp": ref_logp,
        "ref_lse": ref_lse,
        "weights": weights,
    }
