"""Decoding settings shared by ``llmq generate`` and ``llmq eval`` (recipe keys / ``--flags``).

Plain data: the keys, their validation and the values derived from them.  What acts on models —
loading a guide, building logits processors, scoring candidates — lives in
:mod:`llmq.decoding.guided` and :mod:`llmq.decoding.best_of_n`.
"""

from __future__ import annotations

import dataclasses
import math

from llmq.errors import UserError
from llmq.models import check_model_reference
from llmq.rollout import SamplingParams
from llmq.rollout.engines import EngineConfig


@dataclasses.dataclass
class DecodingOptions(EngineConfig):
    """How answers are decoded, and by which engine; a config that inherits it defines
    ``temperature``, ``top_p`` and ``seed``."""

    decoding: str = dataclasses.field(
        default="sample",
        metadata={
            "help": "sample (temperature / top-p; temperature 0 is greedy), greedy, beam (beam search ranking by "
            "the summed log-probs: on a DPO policy, "
            "search on its implicit Q*, docs/algorithms.md §3.6; with guide_model, on the guide's implicit reward), "
            "or guided (token-level sampling "
            "of the model reweighted by guide_model's advantages, π_ref·exp(A/guidance_temperature) on the top "
            "guidance_top_k tokens; temperature 0: argmax), "
            "best_of_n (sample num_candidates, keep the best by scorer), maj_at_n (sample num_candidates, keep one "
            "with the most frequent final answer), "
            "or qstar (A* over reasoning steps guided by the Q-value model at qvm_path, docs/algorithms.md §4).",
            "choices": ["sample", "greedy", "beam", "guided", "best_of_n", "maj_at_n", "qstar"],
        },
    )
    qvm_path: str | None = dataclasses.field(
        default=None,
        metadata={"help": "decoding qstar and scorer qvm: folder of a Q-value model from `llmq train --method qvm`."},
    )
    search_budget: int = dataclasses.field(default=16, metadata={"help": "decoding qstar: expansions per question."})
    search_candidates: int = dataclasses.field(
        default=4, metadata={"help": "decoding qstar: candidate next steps K per expansion."}
    )
    search_lambda: float = dataclasses.field(
        default=1.0,
        metadata={
            "help": "decoding qstar: λ, the weight of the outcome against the process utility: the search maximises "
            "Agg(R_P) + λ·outcome, expanding by f = g + λh (docs/algorithms.md §4.3)."
        },
    )
    search_utility: str = dataclasses.field(
        default="none",
        metadata={
            "help": "decoding qstar: the process utility R_P of each step (g: their search_aggregate): none (g ≡ 0), "
            "qvm (the QVM's Q of the step, clipped to [0, 1]), prm (the step score of the process reward model at "
            "prm_path), or rules (-1 for a step with a false equation, checked exactly with sympy, else 0).",
            "choices": ["none", "qvm", "prm", "rules"],
        },
    )
    search_aggregate: str = dataclasses.field(
        default="min",
        metadata={
            "help": "How step utilities combine into g (decoding qstar) and PRM step scores into an answer's score "
            "(scorer prm): min, last, or sum (qstar: only for rules, whose utilities are penalties <= 0).",
            "choices": ["min", "last", "sum"],
        },
    )
    prm_path: str | None = dataclasses.field(
        default=None,
        metadata={
            "help": "search_utility prm and scorer prm: a process reward model, a token-classification checkpoint "
            "(as TRL's PRMTrainer trains) or a sequence-classification one."
        },
    )
    prm_step_separator: str = dataclasses.field(
        default="\n", metadata={"help": "What the PRM saw after each step in training (TRL's step_separator)."}
    )
    search_heuristic: str = dataclasses.field(
        default="inherited",
        metadata={
            "help": "decoding qstar: h of a child = Q of its step (inherited) or the max Q of its own proposals "
            "(child).",
            "choices": ["inherited", "child"],
        },
    )
    search_max_depth: int = dataclasses.field(default=12, metadata={"help": "decoding qstar: most steps per answer."})
    search_finish: str = dataclasses.field(
        default="rollout",
        metadata={
            "help": "decoding qstar: what becomes of an answer the search leaves unfinished (the budget ran out, or "
            "search_max_depth was reached, before a step that ends the answer): rollout (the policy samples its rest "
            "at the same temperature, up to max_new_tokens in all; those tokens count as sampled) or none (it is "
            "scored as it is, unfinished).",
            "choices": ["rollout", "none"],
        },
    )
    step_max_tokens: int = dataclasses.field(
        default=96, metadata={"help": "decoding qstar: tokens per reasoning step."}
    )
    num_candidates: int = dataclasses.field(
        default=8, metadata={"help": "Samples N per question for decoding best_of_n and maj_at_n."}
    )
    scorer: str = dataclasses.field(
        default="verifier",
        metadata={
            "help": "Candidate scores for best_of_n (and maj_at_n ties): verifier (the task's verifier against the "
            "gold answer: an oracle at evaluation time), "
            "implicit_reward (Σ β·log π_guide/π_model of guide_model), likelihood (the model's summed log-probs), "
            "qvm (the value head at qvm_path "
            "scoring each answer by the Q of its last step given the steps before it: its estimate of the answer "
            "being correct), or prm (the search_aggregate of the step scores of the PRM at prm_path).",
            "choices": ["verifier", "implicit_reward", "likelihood", "qvm", "prm"],
        },
    )
    num_beams: int = dataclasses.field(
        default=4, metadata={"help": "Beam width of decoding: beam; answers per question must not exceed it."}
    )
    guide_model: str | None = dataclasses.field(
        default=None,
        metadata={
            "help": "Policy (trained by ShiQ or DPO against model_name_or_path, which then plays the reference) "
            "whose Q guides decoding "
            "(guided, beam) or scores candidates (scorer implicit_reward)."
        },
    )
    guide_beta: float = dataclasses.field(
        default=0.1, metadata={"help": "The β guide_model was trained with: its advantages are β·log π_guide/π_model."}
    )
    guidance_temperature: float | None = dataclasses.field(
        default=None,
        metadata={
            "help": "Decoding temperature β_dec on the advantages; default guide_beta, which samples the guide "
            "itself. Smaller follows Q harder."
        },
    )
    guidance_top_k: int = dataclasses.field(
        default=20, metadata={"help": "Guided decoding reweights only the model's top-k tokens per step (0: all)."}
    )

    def check_decoding(self, answers: int, answers_key: str) -> None:
        """Consistency of the decoding keys with ``answers`` per question (recipe key ``answers_key``)."""
        self.check_engine()
        if self.engine != "hf" and (self.decoding == "guided" or (self.decoding == "beam" and self.guide_model)):
            raise UserError(
                f"decoding {self.decoding} with guide_model needs engine hf (a logits processor reweights every "
                "token), "
                f"not engine {self.engine}"
            )
        if self.engine == "vllm_server" and self.decoding == "beam":
            raise UserError(
                "decoding beam needs engine hf or vllm: a vLLM server's completions API has no beam search"
            )
        if not 0 <= self.temperature < math.inf:  # NaN fails too
            raise UserError(f"key 'temperature' must be >= 0 (0 is greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise UserError(f"key 'top_p' must be in (0, 1], got {self.top_p}")
        selecting = self.decoding in ("best_of_n", "maj_at_n")
        if answers > 1 and (
            self.decoding == "greedy" or (self.temperature == 0 and self.decoding in ("sample", "guided"))
        ):
            raise UserError(
                f"key '{answers_key}' > 1 needs 'temperature' > 0 with decoding sample or guided, or decoding beam "
                "(greedy answers would all be identical)"
            )
        if self.decoding == "beam" and not 1 <= answers <= self.num_beams:
            raise UserError(
                f"key '{answers_key}' ({answers}) must not exceed 'num_beams' ({self.num_beams}) with decoding beam"
            )
        if selecting and (self.temperature == 0 or self.num_candidates < 2):
            raise UserError(f"decoding {self.decoding} needs 'temperature' > 0 and 'num_candidates' >= 2")
        if self.decoding == "best_of_n" and answers > self.num_candidates:
            raise UserError(
                f"key '{answers_key}' ({answers}) must not exceed 'num_candidates' ({self.num_candidates}) with "
                "decoding best_of_n"
            )
        if self.decoding == "maj_at_n" and answers != 1:
            raise UserError(f"key '{answers_key}' must be 1 with decoding maj_at_n (one majority answer per question)")
        if selecting and self.scorer == "qvm" and self.qvm_path is None:
            raise UserError("scorer qvm needs key 'qvm_path': a Q-value model from `llmq train --method qvm`")
        if self.decoding == "qstar":
            if self.qvm_path is None:
                raise UserError("decoding qstar needs key 'qvm_path': a Q-value model from `llmq train --method qvm`")
            if answers != 1 or self.temperature == 0:
                raise UserError(
                    "decoding qstar returns one answer per question and samples its candidate steps: 'num_samples' "
                    "1 and 'temperature' > 0"
                )
            if min(self.search_budget, self.search_candidates, self.search_max_depth, self.step_max_tokens) < 1:
                raise UserError(
                    "keys 'search_budget', 'search_candidates', 'search_max_depth' and 'step_max_tokens' must be at "
                    "least 1"
                )
            if self.search_lambda <= 0:
                raise UserError(
                    f"key 'search_lambda' must be > 0 (the weight of the QVM's h in f), got {self.search_lambda}"
                )
            if self.search_aggregate == "sum" and self.search_utility in ("qvm", "prm"):
                raise UserError(
                    f"search_aggregate sum with search_utility {self.search_utility}: its utilities are probabilities "
                    "that every further step would add to (the QVM's: its outcome estimate counted once per step), "
                    "so g would bound nothing and favour long answers; use min or last (sum is for rules' penalties)"
                )
        uses_prm = (self.decoding == "qstar" and self.search_utility == "prm") or (selecting and self.scorer == "prm")
        if uses_prm and self.prm_path is None:
            raise UserError("search_utility prm and scorer prm need key 'prm_path': a process reward model")
        if self.prm_path is not None and not uses_prm:
            raise UserError(
                "key 'prm_path' is used by decoding qstar with search_utility prm or by scorer prm; not by decoding "
                f"{self.decoding} with scorer {self.scorer} and search_utility {self.search_utility}"
            )
        if self.prm_path is not None:
            try:
                check_model_reference(self.prm_path)
            except UserError as error:
                raise UserError(f"key 'prm_path': {error}") from None
        if self.decoding == "guided" and self.guide_model is None:
            raise UserError("decoding guided needs key 'guide_model': the policy whose Q guides the model")
        if selecting and self.scorer == "implicit_reward" and self.guide_model is None:
            raise UserError(
                "scorer implicit_reward needs key 'guide_model': the policy whose implicit reward scores the "
                "candidates"
            )
        if self.guide_model is None:
            return
        if not (self.decoding in ("guided", "beam") or (selecting and self.scorer == "implicit_reward")):
            raise UserError(
                "key 'guide_model' is used by decoding guided or beam, or by scorer implicit_reward; not by "
                f"decoding {self.decoding} with scorer {self.scorer}"
            )
        if (
            self.guide_beta <= 0
            or (self.guidance_temperature is not None and self.guidance_temperature <= 0)
            or self.guidance_top_k < 0
        ):
            raise UserError("keys 'guide_beta' and 'guidance_temperature' must be > 0 and 'guidance_top_k' >= 0")
        try:
            check_model_reference(self.guide_model)
        except UserError as error:
            raise UserError(f"key 'guide_model': {error}") from None

    @property
    def uses_prm(self) -> bool:
        """Whether decoding needs the process reward model at ``prm_path``."""
        return self.prm_path is not None

    @property
    def uses_qvm(self) -> bool:
        """Whether decoding needs the QVM at ``qvm_path`` (Q* search, or best-of-N / majority scored by it)."""
        return self.decoding == "qstar" or (self.decoding in ("best_of_n", "maj_at_n") and self.scorer == "qvm")

    def candidates_per_question(self, answers: int) -> int:
        """How many completions the engine generates per question."""
        return self.num_candidates if self.decoding in ("best_of_n", "maj_at_n") else answers

    def sampling(self, max_new_tokens: int) -> SamplingParams:
        return SamplingParams(
            max_new_tokens=max_new_tokens,
            temperature=0.0 if self.decoding == "greedy" else self.temperature,
            top_p=self.top_p,
            seed=self.seed,
            num_beams=self.num_beams if self.decoding == "beam" else 1,
        )

    def decoding_record(self) -> dict:
        """The decoding keys and the engine, for reports and dataset settings."""
        engine_keys = {field.name for field in dataclasses.fields(EngineConfig)}
        decoding = {
            f.name: getattr(self, f.name) for f in dataclasses.fields(DecodingOptions) if f.name not in engine_keys
        }
        return decoding | self.engine_record()
