"""Exact oracles for validating token-level RL losses (docs/algorithms.md §8).

* :class:`TokenMDP`, :func:`toy_mdp`, :func:`random_mdp` — finite token MDPs, optionally with
  stochastic observation steps; :func:`make_batch` turns their trajectories into the llmq batch.
* :func:`soft_optimal`, :func:`evaluate`, :func:`hard_optimal` — backward DP for ``Q*``/``V*``/``π*``,
  ``Q^π`` and ``Q_hard``; :func:`policy_summary`, :func:`exponential_utility_q` — policy-level
  numbers and the E6 identity.
* :class:`TabularLM` — a per-state logit table with a HF causal LM's ``forward``, so a loss can
  be trained to its fixed point and compared with the oracle.
"""

from llmq.testing.mdp import Policy, State, TokenMDP, make_batch, random_mdp, toy_mdp
from llmq.testing.oracle import (
    PolicySummary,
    Values,
    evaluate,
    exponential_utility_q,
    hard_optimal,
    policy_summary,
    soft_optimal,
)
from llmq.testing.tabular import NON_ACTION_LOGIT, TabularLM, TabularLMOutput

__all__ = [
    "NON_ACTION_LOGIT",
    "Policy",
    "PolicySummary",
    "State",
    "TabularLM",
    "TabularLMOutput",
    "TokenMDP",
    "Values",
    "evaluate",
    "exponential_utility_q",
    "hard_optimal",
    "make_batch",
    "policy_summary",
    "random_mdp",
    "soft_optimal",
    "toy_mdp",
]
