"""Agent environments for step-level offline RL (Digi-Q, docs/algorithms.md §5).

``llmq.envs.textworld``: TextWorld text games (needs the ``agents`` extra,
``pip install 'llmq[agents]'``) — game generation, a free-text environment, trajectory
collection into a ``datasets.Dataset`` and agent evaluation.  Import it explicitly; this package
imports nothing optional.
"""
