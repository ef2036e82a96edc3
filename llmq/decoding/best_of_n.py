"""Best-of-N and maj@N over sampled candidates, with a pluggable scorer.

Scorers give one number per candidate:

* ``verifier`` — the task's verifier against the gold answer (training-time extraction; at
  evaluation time it is an oracle, an upper bound);
* ``implicit_reward`` — ``Σ_t β·log π_θ(a_t|s_t)/π_ref(a_t|s_t)`` of a policy π_θ (DPO or ShiQ)
  against the generating model π_ref.  By (R2) it equals ``R(y) − V*(x)``, so among candidates
  for one prompt it ranks exactly as the reward the policy learned;
* ``likelihood`` — the generating model's own ``Σ_t log π(a_t|s_t)``;
* ``qvm`` — a Q-value model from ``llmq train --method qvm`` (value heads on the model's frozen
  features), scoring each answer's last step given the steps before it;
* ``prm`` — a process reward model's step scores of the answer, aggregated (min, last or sum);
* any callable ``(prompts, candidates) -> scores`` for value heads or external reward models.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence

import torch

from llmq.data.trajectories import TrajectoryCollator, length_ordered_batches, tokenize_trajectory
from llmq.decoding.options import DecodingOptions
from llmq.models.prm import ProcessRewardModel
from llmq.models.qvm import FeatureQVM, ReasoningStep, split_steps
from llmq.models.value_heads import CriticHeads
from llmq.qfunctions import ImplicitQ
from llmq.rollout import Completion, Prompt

Scorer = Callable[[list[Prompt], list[list[Completion]]], list[list[float]]]


def likelihood_scores(prompts: list[Prompt], candidates: list[list[Completion]]) -> list[list[float]]:
    """The generating model's summed log-probs of each candidate (no extra forward pass)."""
    return [[sum(c.logprobs) for c in group] for group in candidates]


class ImplicitRewardScorer:
    """``Σ_t r_θ`` of each candidate under ``ImplicitQ(policy, reference, beta)`` (§3.5, R2).

    Args:
        policy: π_θ, a causal LM trained against ``reference``.
        reference: π_ref (usually the model that generated the candidates); ``None`` for a PEFT policy.
        beta: the β the policy was trained with.
        tokenizer: the shared tokenizer; chat prompts use its chat template, as in training.
        batch_size: candidates per forward pass.
    """

    def __init__(
        self, policy: torch.nn.Module, reference: torch.nn.Module | None, beta: float, tokenizer, batch_size: int = 8
    ) -> None:
        self.q = ImplicitQ(policy, reference, beta)
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.collate = TrajectoryCollator(tokenizer.pad_token_id)

    def __call__(self, prompts: list[Prompt], candidates: list[list[Completion]]) -> list[list[float]]:
        rows = []
        for prompt, group in zip(prompts, candidates):
            for completion in group:
                if isinstance(prompt, str):
                    rows.append({"prompt": prompt, "completion": completion.text, "reward": 0.0})
                else:
                    rows.append(
                        {
                            "prompt": list(prompt),
                            "completion": [{"role": "assistant", "content": completion.text}],
                            "reward": 0.0,
                        }
                    )
        device = next(self.q.model.parameters()).device
        tokenized = [tokenize_trajectory(row, self.tokenizer, max_length=10**9, index=i) for i, row in enumerate(rows)]
        totals = [0.0] * len(rows)
        for indices in length_ordered_batches([len(row["input_ids"]) for row in tokenized], self.batch_size):
            batch = self.collate([tokenized[i] for i in indices])
            rewards = self.q.advantages(batch["input_ids"].to(device), batch["attention_mask"].to(device))
            for i, total in zip(indices, (rewards.float().cpu() * batch["act_mask"]).sum(dim=-1).tolist()):
                totals[i] = total
        sizes = [len(group) for group in candidates]
        return [totals[sum(sizes[:i]) : sum(sizes[: i + 1])] for i in range(len(sizes))]


def qvm_scores(
    qvm: tuple[CriticHeads, dict], model, tokenizer, prompts: list[Prompt], candidates: list[list[Completion]]
) -> list[list[float]]:
    """``Q(steps before, last step)`` of each candidate by ``qvm``, the ``(heads, metadata)`` of
    :func:`~llmq.models.qvm.load_qvm`: the answer cut into steps at the QVM's delimiter, scored where it
    ends — a final step's training label is whether the answer was correct, so this is the QVM's estimate of
    the answer's correctness."""
    heads, metadata = qvm
    scores = []
    for prompt, group in zip(prompts, candidates):
        text = (
            prompt
            if isinstance(prompt, str)
            else tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        )
        qvm = FeatureQVM(model, tokenizer, heads, text, layer=metadata["layer"])
        pairs = []
        for completion in group:
            steps = split_steps(completion.text, metadata["delimiter"]) or [""]
            pairs.append((tuple(ReasoningStep(step, False) for step in steps[:-1]), ReasoningStep(steps[-1], True)))
        scores.append(qvm(pairs))
    return scores


def prm_scores(
    prm: ProcessRewardModel, aggregate: str, prompts: list[Prompt], candidates: list[list[Completion]]
) -> list[list[float]]:
    """``aggregate`` (min, last or sum) of ``prm``'s step scores of each candidate, cut into steps at the PRM's
    step separator, after the question (the last user message of a chat prompt)."""
    combine = {"min": min, "last": lambda scores: scores[-1], "sum": sum}[aggregate]
    scores = []
    for prompt, group in zip(prompts, candidates):
        question = prompt if isinstance(prompt, str) else prompt[-1]["content"]
        steps_of = [[s for s in c.text.split(prm.step_separator) if s.strip()] or [c.text] for c in group]
        scores.append([combine(prm.step_scores(question, steps)) for steps in steps_of])
    return scores


def best_of_n(scores: Sequence[float], keep: int = 1) -> list[int]:
    """Indices of the ``keep`` highest-scored candidates, best first (ties: the earlier sample)."""
    return sorted(range(len(scores)), key=lambda i: -scores[i])[:keep]


def majority_vote(answers: Sequence[str | None], scores: Sequence[float] | None = None) -> int:
    """Index of the candidate that represents the most frequent extracted answer.

    Among the candidates with that answer the highest-scored one is returned (the first without
    scores); answer ties go to the answer whose candidates score more in total, then to the
    answer seen first.  Candidates without an answer do not vote; if none has one, 0.
    """
    scores = [0.0] * len(answers) if scores is None else list(scores)
    votes = Counter(a for a in answers if a is not None)
    if not votes:
        return 0
    totals = {a: sum(s for b, s in zip(answers, scores) if b == a) for a in votes}
    first_seen = {a: answers.index(a) for a in votes}
    winner = max(votes, key=lambda a: (votes[a], totals[a], -first_seen[a]))
    return max((i for i, a in enumerate(answers) if a == winner), key=lambda i: (scores[i], -i))


def select_candidates(
    options: DecodingOptions,
    prompts: list[Prompt],
    candidates: list[list[Completion]],
    verdicts: list[list],
    model,
    tokenizer,
    answers: int,
    guide: torch.nn.Module | None = None,
    qvm: tuple[CriticHeads, dict] | None = None,
    prm: ProcessRewardModel | None = None,
) -> tuple[list[list[int]], list[list[float]] | None]:
    """Which ``answers`` candidates of each question to keep (decoding best_of_n / maj_at_n; any
    other decoding keeps all).

    ``verdicts[i][j]`` is the task verifier's verdict on candidate ``j`` of question ``i`` (its
    ``correct`` is the verifier score, its ``answer`` the vote); ``guide`` is the loaded
    ``guide_model`` that scorer implicit_reward needs, ``qvm`` and ``prm`` the loaded models that scorers qvm and
    prm need.
    Returns the kept indices, best first, and every candidate's score (``None`` when nothing is selected).
    """
    if options.decoding not in ("best_of_n", "maj_at_n"):
        return [list(range(len(group))) for group in candidates], None
    if options.scorer == "verifier":
        scores = [[float(v.correct) for v in group] for group in verdicts]
    elif options.scorer == "likelihood":
        scores = likelihood_scores(prompts, candidates)
    elif options.scorer == "qvm":
        scores = qvm_scores(qvm, model, tokenizer, prompts, candidates)
    elif options.scorer == "prm":
        scores = prm_scores(prm, options.search_aggregate, prompts, candidates)
    else:
        scores = ImplicitRewardScorer(guide, model, options.guide_beta, tokenizer)(prompts, candidates)
    if options.decoding == "best_of_n":
        return [best_of_n(group_scores, keep=answers) for group_scores in scores], scores
    voted = [
        majority_vote([v.answer for v in group_verdicts], group_scores)
        for group_verdicts, group_scores in zip(verdicts, scores)
    ]
    return [[index] for index in voted], scores
