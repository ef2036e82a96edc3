"""Evaluation task specs and their data.

Task specs live in the repository's ``eval/`` folder (``eval/NAME.yaml``); a path to any YAML file
of the same shape works too. A spec's questions come from one of two sources:

* a dataset: ``{data_dir}/{local_file}`` when a local copy exists (``data_dir`` from the recipe, else
  ``$LLMQ_DATA_DIR``), otherwise the Hugging Face Hub (``hub_path``, ``hub_name``);
* a reasoning-gym generator (``reasoning_gym: {dataset, config, seeds, sizes}``): each split is the
  generator's items at that split's seed. Seeds far apart give disjoint item streams (reasoning-gym
  seeds item ``i`` with ``seed + i``), and every other split (train, validation) drops each question
  that the test split asks, so no test question is trained on or tuned on.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import datasets
import reasoning_gym
import yaml

from llmq.errors import UserError
from reward_models.gsm8k import extract_strict, gold_answer, score_gsm8k
from reward_models.math import score_math
from reward_models.reasoning_gym import score_reasoning_gym

TASKS_DIR = Path(__file__).resolve().parents[2] / "eval"


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    name: str
    scorer: str  # gsm8k, math, reasoning_gym
    prompt: str
    max_new_tokens: int
    # a dataset: local copy or Hub
    local_file: str | None = None
    hub_path: str | None = None
    hub_name: str | None = None
    question_field: str = "question"
    answer_field: str = "answer"
    # or a reasoning-gym generator: {dataset, config, seeds: {split: seed}, sizes: {split: size}}
    reasoning_gym: dict | None = None


_COMMON_KEYS = {"name", "scorer", "prompt", "max_new_tokens"}
_DATASET_KEYS = {"local_file", "hub_path", "hub_name", "question_field", "answer_field"}
_GENERATOR_KEYS = {"dataset", "config", "seeds", "sizes"}


def available_tasks() -> list[str]:
    return sorted(path.stem for path in TASKS_DIR.glob("*.yaml"))


def load_task(name_or_path: str) -> TaskSpec:
    """Read ``eval/NAME.yaml`` (or a YAML path) into a :class:`TaskSpec`."""
    path = Path(name_or_path) if name_or_path.endswith((".yaml", ".yml")) else TASKS_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        raise UserError(
            f"unknown task '{name_or_path}'; available: {', '.join(available_tasks())}, or a path to a task YAML"
        )
    content = yaml.safe_load(path.read_text())
    given = set(content) if isinstance(content, dict) else set()
    fields = _COMMON_KEYS | ({"reasoning_gym"} if "reasoning_gym" in given else _DATASET_KEYS)
    if given != fields:
        raise UserError(
            f"task spec {path}: expected keys {sorted(fields)}; missing {sorted(fields - given)}, unknown "
            f"{sorted(given - fields)}"
        )
    generator = content.get("reasoning_gym")
    if generator is not None:
        keys = set(generator) if isinstance(generator, dict) else set()
        if keys != _GENERATOR_KEYS or not all(isinstance(generator[k], dict) for k in ("config", "seeds", "sizes")):
            raise UserError(
                f"task spec {path}: key 'reasoning_gym' needs the mappings config, seeds and sizes and the name "
                f"dataset; got {sorted(keys)}"
            )
        if set(generator["seeds"]) != set(generator["sizes"]) or "test" not in generator["seeds"]:
            raise UserError(
                f"task spec {path}: reasoning_gym seeds and sizes must name the same splits, test among them"
            )
    elif content["scorer"] == "reasoning_gym":
        raise UserError(f"task spec {path}: scorer reasoning_gym needs a reasoning_gym generator in the spec")
    return TaskSpec(**content)


def _generated_rows(task: TaskSpec, split: str) -> list[dict]:
    """A reasoning-gym split as rows; every split but test without the test split's questions."""
    generator = task.reasoning_gym
    if split not in generator["seeds"]:
        raise UserError(f"task {task.name} has no split '{split}'; its splits: {', '.join(generator['seeds'])}")

    def items(name: str) -> list[dict]:
        dataset = reasoning_gym.create_dataset(
            generator["dataset"], seed=generator["seeds"][name], size=generator["sizes"][name], **generator["config"]
        )
        return [dataset[i] for i in range(len(dataset))]

    rows = items(split)
    if split != "test":
        asked = {item["question"] for item in items("test")}
        rows = [item for item in rows if item["question"] not in asked]
    return [{"index": i, "question": item["question"], "answer": item["answer"]} for i, item in enumerate(rows)]


def local_data_dir(data_dir: str | None) -> Path | None:
    chosen = data_dir or os.environ.get("LLMQ_DATA_DIR")
    return Path(chosen) if chosen else None


def load_task_rows(task: TaskSpec, split: str = "test", data_dir: str | None = None) -> list[dict]:
    """Rows of ``task`` as dicts ``{"question", "answer", "index"}`` (``answer`` = the raw gold field).

    Read from the local copy when there is one, else from the Hub; :class:`UserError` when neither
    can be read, naming the file looked for and why the Hub failed. A reasoning-gym task generates its rows."""
    if task.reasoning_gym is not None:
        return _generated_rows(task, split)
    root = local_data_dir(data_dir)
    local_file = task.local_file.format(split=split)
    if root is not None and (root / local_file).is_file():
        path = root / local_file
        raw = []
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            if line.strip():
                try:
                    raw.append(json.loads(line))
                except json.JSONDecodeError as error:
                    raise UserError(f"{path}:{number}: not a JSON line ({error.msg})") from None
    else:
        try:
            raw = datasets.load_dataset(task.hub_path, task.hub_name, split=split)
        except Exception as error:  # offline, unknown split, Hub or cache trouble: datasets raises many types
            local = (
                f"no {root / local_file}"
                if root is not None
                else f"no local copy ({local_file} under data_dir or $LLMQ_DATA_DIR, neither is set)"
            )
            hub = f"'{task.hub_path}'" + (f" (config {task.hub_name})" if task.hub_name else "")
            raise UserError(
                f"task {task.name}, split {split}: {local}, and the Hub dataset {hub} could not be loaded "
                f"({type(error).__name__}: {' '.join(str(error).split())})"
            ) from None
    rows = []
    for index, row in enumerate(raw):
        missing = [f for f in (task.question_field, task.answer_field) if f not in row]
        if missing:
            raise UserError(f"task {task.name}, row {index}: missing field(s) {missing}")
        rows.append({"index": index, "question": row[task.question_field], "answer": str(row[task.answer_field])})
    return rows


class Verdict(NamedTuple):
    correct: bool  # the final answer is equivalent to the gold one (math-verify)
    answer: str | None  # the extracted final answer
    formatted: bool  # the answer is stated in the task's format (GSM8K: '#### N'; MATH: \boxed{})


def task_scorer(task: TaskSpec) -> Callable[[str, str], Verdict]:
    """The task's verifier: ``(completion text, raw gold field) → Verdict``."""
    if task.scorer == "gsm8k":

        def score(text: str, gold: str) -> Verdict:
            result = score_gsm8k(text, gold_answer(gold))
            return Verdict(result["reward"] == 1.0, result["answer"], extract_strict(text) is not None)

        return score
    if task.scorer == "math":

        def score(text: str, gold: str) -> Verdict:
            result = score_math(text, gold)
            return Verdict(result["reward"] == 1.0, result["answer"], result["answer"] is not None)

        return score
    if task.scorer == "reasoning_gym":  # load_task ensures the spec has a generator
        generator = task.reasoning_gym
        dataset = reasoning_gym.create_dataset(generator["dataset"], seed=0, size=1, **generator["config"])

        def score(text: str, gold: str) -> Verdict:
            result = score_reasoning_gym(text, gold, dataset)
            return Verdict(result["reward"] == 1.0, result["answer"], result["answer"] is not None)

        return score
    raise UserError(f"task {task.name}: unknown scorer '{task.scorer}' (gsm8k, math, reasoning_gym)")
