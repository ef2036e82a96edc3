"""The Q-value model (QVM) of Q* search, in one home: reasoning steps, the saved heads, and scoring.

A QVM scores ``Q(s, a)`` for a state ``s`` (the question's prompt plus the steps so far) and a
candidate next step ``a``: :class:`~llmq.models.value_heads.CriticHeads` on frozen features of the
policy model, read through the state's KV cache (:func:`~llmq.models.features.score_continuations`).
``llmq train --method qvm`` fits and saves one (:func:`save_qvm`); ``llmq eval --decoding qstar``
and the ``qvm`` best-of-N scorer load it (:func:`load_qvm`).  docs/algorithms.md §4.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from llmq.errors import UserError
from llmq.models.features import score_continuations
from llmq.models.value_heads import CriticHeads

QVM_METADATA = "qvm.json"
QVM_WEIGHTS = "model.safetensors"


@dataclasses.dataclass(frozen=True)
class ReasoningStep:
    """One step of a solution: its text (with the delimiter that ended it) and whether the model
    ended its answer there (end of sequence)."""

    text: str
    final: bool


State = tuple  # the steps so far, a tuple of ReasoningStep; the question is implicit in the scorer


def split_steps(text: str, delimiter: str) -> list[str]:
    """A solution's steps, each keeping the delimiter that ends it; blank lines stay with the step
    before them, so the steps concatenate back to ``text`` exactly."""
    steps: list[str] = []
    for part in text.split(delimiter):
        if steps and not part.strip():
            steps[-1] += part + delimiter
        else:
            steps.append(part + delimiter)
    if steps:
        steps[-1] = steps[-1][: -len(delimiter)]  # the text does not end with the delimiter it split on
    return [step for step in steps if step] if text else []


def weights_checksum(model) -> str:
    """sha256 of ``model``'s weights in name order, rounded to bfloat16 first: the same checkpoint loaded
    in float32 or bfloat16 has the same checksum, another checkpoint (even of the same shape) another."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu", torch.bfloat16).view(torch.int16).numpy().tobytes())
    return digest.hexdigest()


def save_qvm(heads: CriticHeads, output_dir: str | Path, metadata: dict) -> None:
    """Write the heads (``model.safetensors``) and what is needed to use them (``qvm.json``: base
    model and its weights' checksum, feature layer, step delimiter, head sizes) to ``output_dir``."""
    directory = Path(output_dir)
    save_file({name: value.contiguous() for name, value in heads.state_dict().items()}, str(directory / QVM_WEIGHTS))
    (directory / QVM_METADATA).write_text(json.dumps(metadata, indent=2) + "\n")


def load_qvm(path: str | Path, model) -> tuple[CriticHeads, dict]:
    """The heads and metadata ``llmq train --method qvm`` saved in ``path``, to score steps with the features
    of ``model``: a QVM trained on another model's features would give meaningless scores, so a model
    whose weights are not those the QVM was trained on is a :class:`UserError` naming both."""
    directory = Path(path)
    if not (directory / QVM_METADATA).is_file():
        raise UserError(f"key 'qvm_path': '{path}' holds no {QVM_METADATA} (train one with `llmq train --method qvm`)")
    metadata = json.loads((directory / QVM_METADATA).read_text())
    if "base_model_sha256" not in metadata:
        raise UserError(
            f"key 'qvm_path': {directory / QVM_METADATA} does not record its base model's weights checksum "
            "(base_model_sha256): retrain it with `llmq train --method qvm`"
        )
    if metadata["base_model_sha256"] != weights_checksum(model):
        raise UserError(
            f"key 'qvm_path': the QVM at '{path}' was trained on the features of '{metadata.get('base_model')}', "
            f"whose weights differ from those of the model being decoded, '{model.name_or_path}'"
        )
    heads = CriticHeads(metadata["state_dim"], metadata["state_dim"], metadata["hidden_size"], metadata["num_layers"])
    heads.load_state_dict(load_file(str(directory / QVM_WEIGHTS)))
    return heads.eval(), metadata


class FeatureQVM:
    """A Q-value model ``Q(s, a)`` = mean over heads of :class:`CriticHeads` on frozen features of
    the question + steps so far (state) and of the candidate step (action), read through the
    state's KV cache (:func:`llmq.models.features.score_continuations`)."""

    def __init__(self, model, tokenizer, heads: CriticHeads, prompt: str, layer: int | None = None) -> None:
        self.model, self.tokenizer, self.heads, self.prompt, self.layer = model, tokenizer, heads, prompt, layer

    def __call__(self, pairs: list[tuple[State, ReasoningStep]]) -> list[float]:
        # An answer that ends right after a delimiter ends with an empty final step: the end-of-sequence token is its
        # text.
        def text(step: ReasoningStep) -> str:
            return step.text or self.tokenizer.eos_token

        states = list(dict.fromkeys(state for state, _ in pairs))
        steps_of = {state: list(dict.fromkeys(text(step) for s, step in pairs if s == state)) for state in states}
        prefixes = [self.prompt + "".join(step.text for step in state) for state in states]
        state_features, step_features, _ = score_continuations(
            self.model, self.tokenizer, prefixes, [steps_of[s] for s in states], layer=self.layer, progress=False
        )
        values: dict[tuple[State, str], float] = {}
        with torch.no_grad():
            for state, features, candidates in zip(states, state_features, step_features):
                q = self.heads.q(features[None], candidates[None]).mean(0)[0]
                values.update({(state, step_text): value for step_text, value in zip(steps_of[state], q.tolist())})
        return [values[(state, text(step))] for state, step in pairs]
