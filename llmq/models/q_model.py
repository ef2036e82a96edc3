"""Q models: causal LMs whose logits are ``Q/β`` beside another model's (docs/algorithms.md §6.6).

A Q model is trained by ShiQ with ``q_model`` against a frozen reference of any size that shares its vocabulary;
the policy it stands for is ``softmax(ℓ_ref + ℓ_Q)`` (E5).  Guided decoding then adds its logits to the generating
model's in one forward of the Q model, so a small Q model guides a large model for the small model's cost.
"""

from __future__ import annotations

import torch

# The config key that marks a Q model (saved in config.json with the model); its value records the training β.
Q_MODEL_KEY = "llmq_q_model"


def is_q_model(model: torch.nn.Module) -> bool:
    return getattr(model.config, Q_MODEL_KEY, None) is not None


def make_q_model(model: torch.nn.Module, beta: float) -> None:
    """Turn a causal LM into a Q model in place: a zero-initialised LM head of its own (untied from the input
    embeddings), so ``Q ≡ 0`` and the policy equals the reference before training."""
    head = model.get_output_embeddings()
    zero_head = torch.nn.Linear(
        head.in_features, head.out_features, bias=False, device=head.weight.device, dtype=head.weight.dtype
    )
    torch.nn.init.zeros_(zero_head.weight)
    model.set_output_embeddings(zero_head)
    model.config.tie_word_embeddings = False
    setattr(model.config, Q_MODEL_KEY, {"beta": beta})
