"""Decoding settings shared by ``llmq generate`` and ``llmq eval`` (recipe keys / ``--flags``)."""

from __future__ import annotations

import dataclasses

from llmq.errors import UserError
from llmq.models import check_model_reference
from llmq.rollout import SamplingParams


@dataclasses.dataclass
class DecodingOptions:
    """How answers are decoded; a config that inherits it defines ``temperature``, ``top_p`` and ``seed``."""

    decoding: str = dataclasses.field(
        default="sample",
        metadata={
            "help": "sample (temperature / top-p; temperature 0 is greedy), greedy, beam (beam search ranking by the summed log-probs: on a DPO policy, "
            "search on its implicit Q*, ALGORITHMS.md §3.6; with guide_model, on the guide's implicit reward), or guided (token-level sampling "
            "of the model reweighted by guide_model's advantages, π_ref·exp(A/guidance_beta) on the top guidance_top_k tokens; temperature 0: argmax).",
            "choices": ["sample", "greedy", "beam", "guided"],
        },
    )
    num_beams: int = dataclasses.field(default=4, metadata={"help": "Beam width of decoding: beam; answers per question must not exceed it."})
    guide_model: str | None = dataclasses.field(
        default=None,
        metadata={"help": "Policy (trained by ShiQ or DPO against model_name_or_path, which then plays the reference) whose Q guides decoding: guided or beam."},
    )
    guide_beta: float = dataclasses.field(default=0.1, metadata={"help": "The β guide_model was trained with: its advantages are β·log π_guide/π_model."})
    guidance_beta: float | None = dataclasses.field(
        default=None, metadata={"help": "Decoding temperature β_dec on the advantages; default guide_beta, which samples the guide itself. Smaller follows Q harder."}
    )
    guidance_top_k: int = dataclasses.field(default=20, metadata={"help": "Guided decoding reweights only the model's top-k tokens per step (0: all)."})

    def check_decoding(self, answers: int, answers_key: str) -> None:
        """Consistency of the decoding keys with ``answers`` per question (recipe key ``answers_key``)."""
        if answers > 1 and (self.decoding == "greedy" or (self.temperature == 0 and self.decoding != "beam")):
            raise UserError(f"key '{answers_key}' > 1 needs 'temperature' > 0 with decoding sample or guided, or decoding beam (greedy answers would all be identical)")
        if self.decoding == "beam" and not 1 <= answers <= self.num_beams:
            raise UserError(f"key '{answers_key}' ({answers}) must not exceed 'num_beams' ({self.num_beams}) with decoding beam")
        if self.decoding == "guided" and self.guide_model is None:
            raise UserError("decoding guided needs key 'guide_model': the policy whose Q guides the model")
        if self.guide_model is None:
            return
        if self.decoding not in ("guided", "beam"):
            raise UserError(f"key 'guide_model' is used by decoding guided or beam, not {self.decoding}")
        if self.guide_beta <= 0 or (self.guidance_beta is not None and self.guidance_beta <= 0) or self.guidance_top_k < 0:
            raise UserError("keys 'guide_beta' and 'guidance_beta' must be > 0 and 'guidance_top_k' >= 0")
        try:
            check_model_reference(self.guide_model)
        except UserError as error:
            raise UserError(f"key 'guide_model': {error}") from None

    def sampling(self, max_new_tokens: int) -> SamplingParams:
        return SamplingParams(
            max_new_tokens=max_new_tokens,
            temperature=0.0 if self.decoding == "greedy" else self.temperature,
            top_p=self.top_p,
            seed=self.seed,
            num_beams=self.num_beams if self.decoding == "beam" else 1,
        )

    def logits_processors(self, model, tokenizer) -> list:
        """The Q-guidance processor when ``guide_model`` is set (loaded in ``model``'s dtype, on its device)."""
        if self.guide_model is None:
            return []
        from llmq.decoding.guided import QGuidedLogitsProcessor
        from llmq.models import load_model, load_tokenizer

        if load_tokenizer(self.guide_model).get_vocab() != tokenizer.get_vocab():
            raise UserError(f"key 'guide_model': the tokenizer of '{self.guide_model}' differs from the model's; a guide must share its reference's vocabulary")
        guide = load_model(self.guide_model, dtype=str(model.dtype).removeprefix("torch."), device=model.device).eval()
        return [QGuidedLogitsProcessor(guide, beta=self.guide_beta, guidance_beta=self.guidance_beta, top_k=self.guidance_top_k, pad_token_id=tokenizer.pad_token_id)]

    def decoding_record(self) -> dict:
        """The decoding keys, for reports and dataset settings."""
        return {field.name: getattr(self, field.name) for field in dataclasses.fields(DecodingOptions)}
