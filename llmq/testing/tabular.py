"""A tabular "language model": one trainable logit vector per agent state of a :class:`~llmq.testing.TokenMDP`.

Its ``forward`` has a HF causal LM's interface and output layout, so losses written for
transformers run on it unchanged and can be checked against the exact oracle.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import numpy as np
import torch

from llmq.testing.mdp import State, TokenMDP

NON_ACTION_LOGIT = -1e4
"""Logit of BOS and observation tokens in a state row: their probability underflows to exactly 0
(so the softmax over the full vocabulary is the policy over actions) while staying finite (so
``0 · log 0`` terms in full-vocabulary sums stay 0 instead of NaN)."""


@dataclasses.dataclass
class TabularLMOutput:
    """What :meth:`TabularLM.forward` returns; ``logits`` is ``[B, L, n_tokens]`` like ``CausalLMOutput.logits``."""

    logits: torch.Tensor


class TabularLM(torch.nn.Module):
    """Logits ``table[i]`` ``[n_actions]`` for agent state ``mdp.states[i]``.

    Args:
        mdp: the MDP whose agent states get a row.
        init: ``"reference"`` (the MDP's reference logits, offsets included) or ``"zeros"`` (uniform).
        dtype: parameter dtype.
    """

    def __init__(
        self, mdp: TokenMDP, init: Literal["reference", "zeros"] = "reference", dtype: torch.dtype = torch.float64
    ) -> None:
        super().__init__()
        if init == "reference":
            table = torch.tensor(np.stack([mdp.ref_logits[s] for s in mdp.states]), dtype=dtype)
        elif init == "zeros":
            table = torch.zeros(len(mdp.states), mdp.n_actions, dtype=dtype)
        else:
            raise ValueError(f"init must be 'reference' or 'zeros', got {init!r}")
        self.mdp = mdp
        self.table = torch.nn.Parameter(table)

    @classmethod
    def reference(cls, mdp: TokenMDP, dtype: torch.dtype = torch.float64) -> TabularLM:
        """The frozen reference model: logits ``ℓ_ref`` of the MDP."""
        return cls(mdp, "reference", dtype).requires_grad_(False).eval()

    def state_rows(self, input_ids: torch.Tensor) -> torch.Tensor:
        """``[B, L]`` table row of the state ``input_ids[:, 1:p+1]`` at each position ``p``, -1 where that prefix is no
        agent state."""
        rows = []
        for ids in input_ids.tolist():
            if ids[0] != self.mdp.bos_id:
                raise ValueError(f"every row must start with BOS (id {self.mdp.bos_id}), got {ids}")
            rows.append([self.mdp.state_index.get(tuple(ids[1 : p + 1]), -1) for p in range(len(ids))])
        return torch.tensor(rows, dtype=torch.long, device=self.table.device).reshape(input_ids.shape)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs: object,
    ) -> TabularLMOutput:
        """HF-style logits: row ``p`` scores token ``p + 1`` from state ``input_ids[:, :p+1]``.

        Action columns hold the state's table row and the other columns :data:`NON_ACTION_LOGIT`;
        rows whose prefix is not an agent state (after an action that an observation follows,
        terminal, padding after EOS) are all zeros.  ``logits_to_keep`` selects rows as in transformers' causal LMs
        (the last N, or the positions of a tensor; 0: all).  ``attention_mask`` and other keyword arguments
        (as a trainer passes them) are ignored: each position's state is read from the tokens.
        """
        index = self.state_rows(input_ids)
        index = index[:, -logits_to_keep:] if isinstance(logits_to_keep, int) else index[:, logits_to_keep]
        rows = self.table[index.clamp(min=0)]
        filler = rows.new_full((*index.shape, self.mdp.n_tokens - self.mdp.n_actions), NON_ACTION_LOGIT)
        logits = torch.where((index >= 0)[..., None], torch.cat([rows, filler], dim=-1), 0.0)
        return TabularLMOutput(logits=logits)

    def state_logits(self, state: State) -> torch.Tensor:
        """The (differentiable) action logits ``[n_actions]`` of one agent state."""
        return self.table[self.mdp.state_index[tuple(state)]]

    def policy_probs(self, state: State) -> np.ndarray:
        """``softmax`` of the state's logits, float64 numpy."""
        return torch.softmax(self.state_logits(state).detach().double(), dim=-1).cpu().numpy()

    def policy(self) -> dict[State, np.ndarray]:
        """The learned policy on every agent state, usable wherever the oracle takes a ``Policy``."""
        return {s: self.policy_probs(s) for s in self.mdp.states}
