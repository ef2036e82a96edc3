"""A process reward model (PRM): the probability that each step of a solution is correct (docs/algorithms.md §4.3).

Two checkpoint kinds load, both through transformers without remote code:

* token classification, as TRL's ``PRMTrainer`` trains it: the input is ``[BOS] + prompt + Σ (step +
  step_separator)`` and each step's score is read at the last token of its separator;
* sequence classification: a step's score is the classifier's on the prompt and the steps up to it.

A two-label head scores ``softmax(logits)[1]`` (label 1 = correct, TRL's), a one-label head ``sigmoid(logit)``.
"""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoModelForTokenClassification

from llmq.errors import UserError
from llmq.models.registry import _adapter_base, _load_errors, load_tokenizer, resolve_model

HEADS = {
    "ForTokenClassification": AutoModelForTokenClassification,
    "ForSequenceClassification": AutoModelForSequenceClassification,
}


class ProcessRewardModel:
    """Step scores in [0, 1] of a token- or sequence-classification checkpoint.

    Args:
        path: a local folder or Hub id (``key 'prm_path'``).
        step_separator: what the PRM was trained to see after each step (TRL's ``PRMConfig.step_separator``).
    """

    def __init__(self, path: str, step_separator: str = "\n") -> None:
        try:
            resolved = resolve_model(path)
            _adapter_base(resolved)  # a folder that holds no checkpoint: one line, not transformers' guess
            with _load_errors(path, None):
                architectures = AutoConfig.from_pretrained(resolved).architectures or []
        except UserError as error:
            raise UserError(f"key 'prm_path': {error}") from None
        kinds = [suffix for suffix in HEADS if any(name.endswith(suffix) for name in architectures)]
        if not kinds:
            raise UserError(
                f"key 'prm_path': '{path}' is not a token- or sequence-classification checkpoint (architectures: "
                f"{', '.join(architectures) or 'none'}); TRL's PRMTrainer trains token classification"
            )
        self.per_token = kinds[0] == "ForTokenClassification"
        with _load_errors(path, None):
            self.model = HEADS[kinds[0]].from_pretrained(resolved, dtype=torch.float32).eval()
        self.tokenizer = load_tokenizer(path)
        self.model.config.pad_token_id = self.tokenizer.pad_token_id  # batches of prefixes are padded
        self.separator_ids = self.tokenizer.encode(step_separator, add_special_tokens=False)
        self.step_separator = step_separator

    def _probability(self, logits: torch.Tensor) -> torch.Tensor:
        """P(correct) from ``[..., num_labels]`` logits."""
        return torch.sigmoid(logits[..., 0]) if logits.shape[-1] == 1 else logits.softmax(-1)[..., 1]

    @torch.no_grad()
    def step_scores(self, prompt: str, steps: list[str]) -> list[float]:
        """The score of each step of ``steps`` (texts without their separator) after ``prompt``."""
        if not steps:
            return []
        if not self.per_token:
            texts = [self._text(prompt, steps[: t + 1]) for t in range(len(steps))]
            batch = self.tokenizer(texts, return_tensors="pt", padding=True)
            return self._probability(self.model(**batch).logits).tolist()
        input_ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        if self.tokenizer.bos_token_id is not None:
            input_ids = [self.tokenizer.bos_token_id, *input_ids]
        ends = []
        for step in steps:
            input_ids += self.tokenizer(step, add_special_tokens=False)["input_ids"] + self.separator_ids
            ends.append(len(input_ids) - 1)
        logits = self.model(input_ids=torch.tensor([input_ids])).logits[0]
        return self._probability(logits[ends]).tolist()

    @torch.no_grad()
    def last_step_score(self, prompt: str, steps: list[str]) -> float:
        """The score of the last of ``steps``: one forward pass, not one per earlier step (Q*'s utility of a state)."""
        if self.per_token:
            return self.step_scores(prompt, steps)[-1]
        batch = self.tokenizer([self._text(prompt, steps)], return_tensors="pt")
        return self._probability(self.model(**batch).logits)[0].item()

    def _text(self, prompt: str, steps: list[str]) -> str:
        """A sequence classifier's input: the prompt and the steps, each followed by the separator."""
        return prompt + "".join(step + self.step_separator for step in steps)
