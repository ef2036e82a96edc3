"""Q and V heads on frozen backbone features (Digi-Q, docs/algorithms.md §5.5), with a Polyak target copy."""

from __future__ import annotations

import copy

import torch
from torch import nn


def _mlp(in_features: int, hidden_size: int, num_layers: int) -> nn.Sequential:
    """``num_layers`` ReLU hidden layers, then a scalar output; 0 hidden layers is a linear head."""
    layers: list[nn.Module] = []
    width = in_features
    for _ in range(num_layers):
        layers += [nn.Linear(width, hidden_size), nn.ReLU()]
        width = hidden_size
    return nn.Sequential(*layers, nn.Linear(width, 1))


class CriticHeads(nn.Module):
    """``num_heads`` independent Q heads on ``[state, action]`` features and as many V heads on the state.

    Args:
        state_dim: width of a state's features (the backbone's pooled hidden state of the state text).
        action_dim: width of an action's features (the backbone's features of state + action text,
            Digi-Q's ``q_rep``).
        hidden_size: width of the hidden layers.
        num_layers: hidden layers per head (0: linear heads, exact for one-hot tabular features).
        num_heads: heads per kind (Digi-Q: 2; each Q_i backs up from its own V_i).
    """

    def __init__(
        self, state_dim: int, action_dim: int, hidden_size: int = 256, num_layers: int = 2, num_heads: int = 2
    ) -> None:
        super().__init__()
        self.q_heads = nn.ModuleList(_mlp(state_dim + action_dim, hidden_size, num_layers) for _ in range(num_heads))
        self.v_heads = nn.ModuleList(_mlp(state_dim, hidden_size, num_layers) for _ in range(num_heads))

    def q(self, state: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        """``Q_i(s, a)``: ``[H, B]`` for action features ``[B, D_a]``, ``[H, B, N]`` for N candidates ``[B, N,
        D_a]``."""
        if action.dim() == 3:
            state = state[:, None, :].expand(-1, action.shape[1], -1)
        inputs = torch.cat([state, action], dim=-1)
        return torch.stack([head(inputs).squeeze(-1) for head in self.q_heads])

    def v(self, state: torch.Tensor) -> torch.Tensor:
        """``V_i(s)``, ``[H, B]``."""
        return torch.stack([head(state).squeeze(-1) for head in self.v_heads])


class DigiQCritic(nn.Module):
    """The trained heads and their frozen target copy in one module, so a checkpoint holds both."""

    def __init__(self, heads: CriticHeads) -> None:
        super().__init__()
        self.online = heads
        self.target = copy.deepcopy(heads).requires_grad_(False)

    @torch.no_grad()
    def update_target(self, rate: float) -> None:
        """Polyak averaging ``θ̄ ← (1 − rate)·θ̄ + rate·θ`` (rate 1 copies)."""
        for target, online in zip(self.target.parameters(), self.online.parameters()):
            target.lerp_(online, rate)
