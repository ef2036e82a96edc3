"""``llmq generate``: sample K completions per question of a task, score them with its verifier, save an HF dataset."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from pathlib import Path

import datasets

from llmq.config import check_output_path
from llmq.data.offline import preference_pairs
from llmq.data.tasks import load_task, load_task_rows, task_scorer
from llmq.decoding.best_of_n import select_candidates
from llmq.decoding.guided import guidance_processors, load_guide
from llmq.decoding.options import DecodingOptions
from llmq.errors import UserError
from llmq.models.prm import ProcessRewardModel
from llmq.models.qvm import load_qvm
from llmq.rollout.engines import make_engine

SETTINGS_FILE = "llmq_generation.json"


@dataclasses.dataclass
class GenerateConfig(DecodingOptions):
    """What ``llmq generate`` samples and scores; every field is a recipe key or a ``--flag``."""

    task: str = dataclasses.field(
        default="gsm8k",
        metadata={
            "help": "Task spec whose questions are the prompts and whose verifier gives the rewards (gsm8k, "
            "math500, or a YAML path)."
        },
    )
    split: str = dataclasses.field(default="train", metadata={"help": "Dataset split of the prompts."})
    data_dir: str | None = dataclasses.field(
        default=None, metadata={"help": "Folder with local dataset copies; default $LLMQ_DATA_DIR, else the Hub."}
    )
    limit: int | None = dataclasses.field(default=None, metadata={"help": "Use only the first LIMIT questions."})
    prompt: str | None = dataclasses.field(
        default=None, metadata={"help": "Override the task's prompt template ({question} is replaced)."}
    )
    num_completions: int = dataclasses.field(default=4, metadata={"help": "Completions K sampled per prompt."})
    temperature: float = dataclasses.field(
        default=1.0, metadata={"help": "Sampling temperature (0 = greedy, then K must be 1)."}
    )
    top_p: float = dataclasses.field(default=1.0, metadata={"help": "Nucleus sampling mass."})
    max_new_tokens: int | None = dataclasses.field(
        default=None,
        metadata={
            "help": "Tokens per completion; default the task's. Longer answers are cut and kept; below the task's "
            "budget they are marked truncated (ShiQ bootstraps from them), at it they end their episode."
        },
    )
    format_reward: float = dataclasses.field(
        default=0.0,
        metadata={
            "help": "Added to the 0/1 correctness reward when the answer is stated in the task's format (GSM8K: "
            "'#### N', MATH: boxed). A denser signal for models that rarely answer correctly."
        },
    )
    batch_size: int = dataclasses.field(default=8, metadata={"help": "Prompts per generate call."})
    seed: int = dataclasses.field(default=0, metadata={"help": "Sampling seed."})
    dataset_path: str = dataclasses.field(
        default="outputs/offline_data",
        metadata={"help": "Where the HF dataset is saved (datasets.load_from_disk reads it)."},
    )
    min_score: float | None = dataclasses.field(
        default=None,
        metadata={
            "help": "With decoding best_of_n: keep a question's kept completions only when their scorer score is at "
            "least this (rejection sampling: an SFT dataset of good answers)."
        },
    )
    pairs_path: str | None = dataclasses.field(
        default=None,
        metadata={
            "help": "Also save preference pairs here: per question, the best vs the worst scored completion "
            "(prompt, chosen, rejected), for DPO."
        },
    )

    def __post_init__(self) -> None:
        if self.num_completions < 1 or (self.limit is not None and self.limit < 1) or self.batch_size < 1:
            raise UserError("keys 'num_completions', 'limit' and 'batch_size' must be at least 1")
        if self.decoding == "qstar":
            raise UserError("decoding qstar answers benchmark questions: use it with llmq eval")
        self.check_decoding(self.num_completions, "num_completions")
        if self.min_score is not None and self.decoding != "best_of_n":
            raise UserError("key 'min_score' needs decoding best_of_n (it thresholds the scorer's scores)")
        load_task(self.task)
        check_output_path(self.dataset_path, "dataset_path")
        if self.pairs_path:
            check_output_path(self.pairs_path, "pairs_path")


def build_offline_dataset(model, tokenizer, config: GenerateConfig, model_name: str):
    """Sample, score and save; returns the ``datasets.Dataset`` (also written to ``config.dataset_path``).

    Rows are conversational: ``prompt`` (the user turn), ``completion`` (the assistant turn),
    ``reward`` (0/1 correctness from the task's verifier, plus ``format_reward`` when the answer is
    stated in the task's format), ``correct``, ``formatted``, ``truncated`` (cut at a ``max_new_tokens``
    below the task's own budget, so not terminal: an answer cut at the task's budget ends its episode,
    as in ``llmq eval``), plus the question index, the gold answer and the extracted answer.  The
    sampling settings and summary statistics are saved beside the data in ``llmq_generation.json``.
    With decoding best_of_n or maj_at_n, ``num_candidates`` are sampled per question and the kept rows
    also carry their ``score`` and the number of ``candidates``; ``min_score`` drops kept rows scoring
    below it.
    """
    task = load_task(config.task)
    questions = load_task_rows(task, config.split, config.data_dir)[: config.limit]
    template = config.prompt or task.prompt
    budget = config.max_new_tokens or task.max_new_tokens
    sampling = config.sampling(budget)
    # An answer cut at the task's own token budget is scored as `llmq eval` scores it: its episode ends there
    # (terminal, V = 0 after it). Only an answer cut below that budget could have gone on, and bootstraps.
    cut_before_the_end = budget < task.max_new_tokens
    prompts = [[{"role": "user", "content": template.replace("{question}", q["question"])}] for q in questions]
    guide = load_guide(config, model, tokenizer) if config.guide_model else None
    qvm = load_qvm(config.qvm_path, model) if config.uses_qvm else None
    prm = ProcessRewardModel(config.prm_path, config.prm_step_separator) if config.uses_prm else None
    engine = make_engine(
        config,
        model,
        tokenizer,
        model_name,
        batch_size=config.batch_size,
        logits_processor=guidance_processors(config, tokenizer, guide),
    )
    started = time.perf_counter()
    with contextlib.closing(engine):  # an in-process vLLM engine frees its memory for the next one
        outputs = engine.generate(prompts, n=config.candidates_per_question(config.num_completions), sampling=sampling)
    score = task_scorer(task)
    verdicts = [[score(c.text, q["answer"]) for c in group] for q, group in zip(questions, outputs)]
    kept, scores = select_candidates(
        config,
        prompts,
        outputs,
        verdicts,
        model,
        tokenizer,
        answers=config.num_completions,
        guide=guide,
        qvm=qvm,
        prm=prm,
    )
    rows = []
    for index, (question, prompt, completions) in enumerate(zip(questions, prompts, outputs)):
        for sample in kept[index]:
            completion, verdict = completions[sample], verdicts[index][sample]
            if scores is not None and config.min_score is not None and scores[index][sample] < config.min_score:
                continue
            selection = {} if scores is None else {"score": scores[index][sample], "candidates": len(completions)}
            rows.append(
                {
                    "prompt": prompt,
                    "completion": [{"role": "assistant", "content": completion.text}],
                    "reward": float(verdict.correct) + config.format_reward * verdict.formatted,
                    "correct": verdict.correct,
                    "formatted": verdict.formatted,
                    "truncated": completion.finish_reason == "length" and cut_before_the_end,
                    "question_index": question["index"],
                    "sample": sample,
                    "answer": question["answer"],
                    "extracted": verdict.answer,
                    # The generating model's log π of each token (raw: before temperature or guidance), as the
                    # engine returned them: behaviour log-probs for off-policy training.
                    "completion_token_ids": completion.token_ids,
                    "completion_logprobs": completion.logprobs,
                }
                | selection
            )
    if not rows:
        if questions and config.min_score is not None:
            raise UserError(
                f"no question's best candidate scored at least min_score {config.min_score}: the dataset would be "
                "empty"
            )
        raise UserError(f"task {task.name} split {config.split} gave no questions")
    dataset = datasets.Dataset.from_list(rows)
    rewards = [row["reward"] for row in rows]
    settings = {
        "model": model_name,
        "generate_config": config.settings_record(),
        "sampling": dataclasses.asdict(sampling),
        "prompt_template": template,
        "questions": len(questions),
        "candidates": sum(len(group) for group in outputs),
        "completions": len(rows),
        "mean_reward": sum(rewards) / len(rewards),
        "correct": sum(r["correct"] for r in rows),
        "formatted": sum(r["formatted"] for r in rows),
        "questions_with_a_correct_sample": len({r["question_index"] for r in rows if r["correct"]}),
        "cut_at_max_new_tokens": sum(c.finish_reason == "length" for group in outputs for c in group),
        "truncated": sum(r["truncated"] for r in rows),
        "wall_time_s": round(time.perf_counter() - started, 2),
    }
    dataset.info.description = json.dumps(settings)
    dataset.save_to_disk(config.dataset_path)
    (Path(config.dataset_path) / SETTINGS_FILE).write_text(json.dumps(settings, indent=2) + "\n")
    if config.pairs_path:
        pairs = preference_pairs(dataset)
        pairs.save_to_disk(config.pairs_path)
        (Path(config.pairs_path) / SETTINGS_FILE).write_text(
            json.dumps(settings | {"pairs": len(pairs)}, indent=2) + "\n"
        )
    return dataset
