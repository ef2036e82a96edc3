"""Q-function views of a policy LM and its reference (docs/algorithms.md §7.1).

A view reads Q-values, state values and advantages off the two models' logits, with the same
shapes whichever loss trained the policy, so decoding and evaluation never care which trainer
produced it.  Every tensor is aligned like :func:`llmq.mdp.token_logprobs`:

* ``q_values(...)[:, p, a]`` — ``Q(s_p, a)`` for every vocabulary token ``a``, ``[B, L, V]``;
* ``values(...)[:, p]`` — ``V(s_p)``, ``[B, L]``;
* ``advantages(...)[:, p]`` — ``Q(s_p, a_p) − V(s_p)`` of the taken token ``a_p = input_ids[:, p]``, ``[B, L]``;

with ``s_p = input_ids[:, :p]``.  Position 0 has no state before it and holds 0.  Prompt,
observation and padding positions hold whatever the models compute there: mask them with
``act_mask``.  In every view ``π_θ(a|s) = π_ref(a|s)·exp((Q(s,a) − V(s))/β)`` (B3).
"""

from __future__ import annotations

import abc

import torch

from llmq.mdp import state_scores, token_logprobs


class QFunction(abc.ABC):
    """A Q-parametrisation of a policy LM relative to its reference (the common interface).

    Each public method runs one forward pass of each model under ``torch.no_grad()`` and
    returns fp32 tensors (fp64 for fp64 models).  The models run in their current mode: call
    ``.eval()`` first for dropout-free values.  Pad batches on the right: given no
    ``position_ids``, a HF causal LM numbers positions ``0..L-1`` whatever the attention mask.

    Args:
        model: the policy: a HF causal LM, a PEFT model or a :class:`llmq.testing.TabularLM` —
            anything whose ``forward(input_ids=..., attention_mask=...)`` returns ``.logits``.
        ref_model: the reference π_ref; ``None`` for a PEFT model, whose reference is then the
            model with its adapters disabled (the base model a new adapter starts from).
        beta: KL temperature β > 0 the policy was trained with.
    """

    def __init__(self, model: torch.nn.Module, ref_model: torch.nn.Module | None, beta: float) -> None:
        if beta <= 0:
            raise ValueError(f"beta must be > 0, got {beta}")
        if ref_model is None and not hasattr(model, "disable_adapter"):
            raise ValueError(
                "ref_model=None needs a PEFT model (its reference is the model with adapters disabled); got a "
                f"{type(model).__name__}"
            )
        self.model = model
        self.ref_model = ref_model
        self.beta = beta

    @torch.no_grad()
    def _logits(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Policy and reference logits ``[B, L, V]`` in the HF convention (row ``p − 1`` scores token ``p``)."""
        inputs = dict(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        logits = self.model(**inputs).logits
        if self.ref_model is not None:
            return logits, self.ref_model(**inputs).logits
        with self.model.disable_adapter():
            return logits, self.model(**inputs).logits

    @abc.abstractmethod
    def _q(self, scores: torch.Tensor, ref_scores: torch.Tensor) -> torch.Tensor:
        """``Q(s, ·)`` from the state-aligned policy and reference logits ``[B, L, V]``."""

    def q_values(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``Q(s_p, a)`` for every vocabulary token ``a``, ``[B, L, V]``."""
        logits, ref_logits = self._logits(input_ids, attention_mask)
        return self._q(state_scores(logits), state_scores(ref_logits))

    @abc.abstractmethod
    def values(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``V(s_p)``, ``[B, L]``."""

    def advantages(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``Q(s_p, a_p) − V(s_p) = β(log π_θ(a_p|s_p) − log π_ref(a_p|s_p))`` of the taken tokens, ``[B, L]``.

        The identity is (B3), so it holds in every view; for a DPO policy this is the per-token
        implicit reward r_θ (§3.5, :func:`llmq.losses.implicit_token_rewards` masks it with act_mask).
        """
        logits, ref_logits = self._logits(input_ids, attention_mask)
        logp, _ = token_logprobs(logits, input_ids)
        ref_logp, _ = token_logprobs(ref_logits, input_ids)
        return self.beta * (logp - ref_logp)


class ShiftedLogits(QFunction):
    """ShiQ's parametrisation (E5): ``Q(s, ·) = β(ℓ_θ(s, ·) − ℓ_ref(s, ·))``, ``V(s) = β(LSE ℓ_θ(s) − LSE ℓ_ref(s))``.

    Both are identified, with no free per-state constant: at ShiQ's fixed point they are ``Q*``
    and ``V*`` of the reward the policy was trained on (its placement included, E8).
    """

    def _q(self, scores: torch.Tensor, ref_scores: torch.Tensor) -> torch.Tensor:
        return self.beta * (scores - ref_scores)

    def values(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        logits, ref_logits = self._logits(input_ids, attention_mask)
        _, lse = token_logprobs(logits, input_ids)
        _, ref_lse = token_logprobs(ref_logits, input_ids)
        return self.beta * (lse - ref_lse)


class ImplicitQ(QFunction):
    """DPO as inverse soft Q-learning (§3.3): ``Q(s, ·) = β log π_θ(·|s)/π_ref(·|s)``, ``V ≡ 0``.

    Preferences identify the reward only up to potential shaping (§1.5), so a DPO policy fixes
    ``Q*`` only up to a per-state constant and ``V*`` only through trajectories from a common
    state (``Σ_t r_θ = R(y) − V*(x)``, R2).  This view picks the one consistent member of that
    class: the MDP whose reward is the implicit reward ``r_θ = β log π_θ/π_ref`` itself (the true
    reward shaped with the potential ``V*``).  Its optimal values are ``V ≡ 0`` and ``Q = r_θ``
    for every token, and (B2) holds exactly: ``β log Σ_a π_ref(a|s) exp(Q(s,a)/β) = β log Σ_a π_θ(a|s) = 0``.
    At DPO's population optimum ``Q(s, ·) = A*(s, ·) = Q*(s, ·) − V*(s)`` of the true reward;
    ``ShiftedLogits`` of the same models differs from this view by exactly the per-state
    ``β(LSE ℓ_θ − LSE ℓ_ref)``.
    """

    def _q(self, scores: torch.Tensor, ref_scores: torch.Tensor) -> torch.Tensor:
        return self.beta * (torch.log_softmax(scores, dim=-1) - torch.log_softmax(ref_scores, dim=-1))

    def values(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``V ≡ 0`` (fp32): no forward pass is needed."""
        return torch.zeros(input_ids.shape, dtype=torch.float32, device=input_ids.device)
