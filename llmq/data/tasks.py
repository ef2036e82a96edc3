"""Evaluation task specs and their data.

Task specs live in the repository's ``eval/`` folder (``eval/NAME.yaml``); a path to any YAML file
of the same shape works too.  Rows come from ``{data_dir}/{local_file}`` when a local copy exists
(``data_dir`` from the recipe, else ``$LLMQ_DATA_DIR``), otherwise from the Hugging Face Hub.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import datasets
import yaml

from llmq.errors import UserError
from reward_models.gsm8k import extract_strict, gold_answer, score_gsm8k
from reward_models.math import score_math

TASKS_DIR = Path(__file__).resolve().parents[2] / "eval"


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    name: str
    local_file: str
    hub_path: str
    hub_name: str | None
    question_field: str
    answer_field: str
    scorer: str
    prompt: str
    max_new_tokens: int


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
    fields = {f.name for f in dataclasses.fields(TaskSpec)}
    if not isinstance(content, dict) or set(content) != fields:
        given = set(content) if isinstance(content, dict) else set()
        raise UserError(
            f"task spec {path}: expected keys {sorted(fields)}; missing {sorted(fields - given)}, unknown "
            f"{sorted(given - fields)}"
        )
    return TaskSpec(**content)


def local_data_dir(data_dir: str | None) -> Path | None:
    chosen = data_dir or os.environ.get("LLMQ_DATA_DIR")
    return Path(chosen) if chosen else None


def load_task_rows(task: TaskSpec, split: str = "test", data_dir: str | None = None) -> list[dict]:
    """Rows of ``task`` as dicts ``{"question", "answer", "index"}`` (``answer`` = the raw gold field).

    Read from the local copy when there is one, else from the Hub; :class:`UserError` when neither
    can be read, naming the file looked for and why the Hub failed."""
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
    raise UserError(f"task {task.name}: unknown scorer '{task.scorer}' (gsm8k, math)")
