"""Methods: what ``llmq train --method NAME`` runs, one module per method.

Each method module exposes its run ``Config`` dataclass, ``config_types(method)`` (the dataclasses
a recipe of that method is parsed into, besides :class:`llmq.config.ModelConfig` and
:class:`llmq.launch.LaunchConfig`), ``run(...)`` (the whole run; returns the summary it writes to
``output_dir/summary.json``) and ``describe(summary, output_dir)`` (the closing line).  Modules are
imported by name when a method is chosen, so ``import llmq`` and ``llmq --help`` load none of them.
"""

from __future__ import annotations

import dataclasses
import importlib
from types import ModuleType

from llmq.errors import UserError


@dataclasses.dataclass(frozen=True)
class Method:
    """A registered method: the module that runs it, one line for ``llmq train --help``, and whether
    its training can run in several processes (``accelerate_config`` / ``num_processes``)."""

    module: str
    summary: str
    multi_process: bool = False


METHODS: dict[str, Method] = {
    "shiq": Method(
        "llmq.methods.offline", "ShiQTrainer on rewarded completions (Bellman-consistent logits)", multi_process=True
    ),
    "dpo": Method(
        "llmq.methods.offline",
        "TRL's DPOTrainer on best-vs-worst pairs of the same data (DPO as inverse-Q)",
        multi_process=True,
    ),
    "sft": Method(
        "llmq.methods.offline",
        "TRL's SFTTrainer on best-of-N extracted completions (rejection sampling)",
        multi_process=True,
    ),
    "online": Method(
        "llmq.methods.online",
        "rounds of sampling from the current policy, verifier rewards, a replay buffer and updates (objective shiq, "
        "or the iterated baselines dpo and sft)",
        multi_process=True,
    ),
    "grpo": Method("llmq.methods.grpo", "TRL's GRPOTrainer on the same prompts and rewards (the peer of online ShiQ)"),
    "digiq": Method(
        "llmq.methods.digiq",
        "Digi-Q on TextWorld games: value heads on frozen features, Best-of-N extraction, SFT actor",
    ),
    "qvm": Method(
        "llmq.methods.qvm", "a Q-value model for Q* search, from gold answers only (the policy is not trained)"
    ),
}
DEFAULT_METHOD = "shiq"


def method_module(name: str) -> ModuleType:
    """The module that runs method ``name``."""
    if name not in METHODS:
        raise UserError(f"key 'method': unknown method '{name}'; choose one of {', '.join(METHODS)}")
    return importlib.import_module(METHODS[name].module)


def method_field(default: str) -> dataclasses.Field:
    """The ``method`` key of every method's run config: one of the registered methods."""
    listing = "; ".join(f"{name}: {method.summary}" for name, method in METHODS.items())
    return dataclasses.field(
        default=default,
        metadata={
            "help": f"{listing}. `llmq train --method NAME --help` lists the keys of one method.",
            "choices": list(METHODS),
        },
    )
