"""Engine-independent sampling settings and results (the same for HF and vLLM engines)."""

from __future__ import annotations

import dataclasses
from typing import Literal, Protocol

Prompt = str | list[dict[str, str]]
"""A raw text prompt, or chat messages rendered with the tokenizer's chat template."""


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to decode: ``temperature == 0`` means greedy decoding; ``num_beams > 1`` means beam search.

    Beam search ranks sequences by the plain sum of their token log-probs (no length
    normalisation: on a DPO policy this sum is the implicit regularised return, docs/algorithms.md §3.6)
    and returns the best ``n <= num_beams`` of them; it ignores temperature, top-p and top-k.
    """

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    stop: tuple[str, ...] = ()
    seed: int = 0
    num_beams: int = 1

    def __post_init__(self) -> None:
        if (
            self.max_new_tokens < 1
            or self.temperature < 0
            or not 0 < self.top_p <= 1
            or self.top_k < 0
            or self.num_beams < 1
        ):
            raise ValueError(f"invalid sampling settings: {self}")


@dataclasses.dataclass
class Completion:
    """One sampled continuation: ``token_ids`` and ``logprobs`` (log π of each sampled token under the
    model, before temperature) cover everything generated; ``text`` stops before a matched stop string."""

    text: str
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: Literal["stop", "length"]


class Engine(Protocol):
    def generate(
        self, prompts: list[Prompt], n: int = 1, sampling: SamplingParams = SamplingParams()
    ) -> list[list[Completion]]:
        """``n`` completions for each prompt, in prompt order."""
        ...

    def close(self) -> None:
        """Release what the engine holds (vLLM's memory, connections); the engine is not used afterwards."""
        ...
