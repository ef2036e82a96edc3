"""``llmq eval``: model × task × decoding → accuracy with a bootstrap 95% interval, and a JSON report."""

from __future__ import annotations

import dataclasses
import json
import time
from collections import Counter
from pathlib import Path

import numpy as np

from llmq.data.tasks import load_task, load_task_rows, task_scorer
from llmq.decoding.options import DecodingOptions
from llmq.errors import UserError
from llmq.rollout import HFEngine


@dataclasses.dataclass
class EvalConfig(DecodingOptions):
    """What to evaluate and how; every field can be a recipe key or a ``--flag``."""

    task: str = dataclasses.field(default="gsm8k", metadata={"help": "Task spec: a name in eval/ (gsm8k, math500) or a path to a task YAML."})
    split: str = dataclasses.field(default="test", metadata={"help": "Dataset split."})
    data_dir: str | None = dataclasses.field(
        default=None,
        metadata={"help": "Folder with local copies (gsm8k/test.jsonl, math500/test.jsonl); default $LLMQ_DATA_DIR, else the Hugging Face Hub."},
    )
    limit: int | None = dataclasses.field(default=None, metadata={"help": "Evaluate only the first LIMIT rows (a fixed subset); default all."})
    prompt: str | None = dataclasses.field(default=None, metadata={"help": "Override the task's prompt template ({question} is replaced)."})
    max_new_tokens: int | None = dataclasses.field(default=None, metadata={"help": "Generation budget per answer; default the task's."})
    temperature: float = dataclasses.field(default=0.0, metadata={"help": "0 = greedy decoding; > 0 samples."})
    top_p: float = dataclasses.field(default=1.0, metadata={"help": "Nucleus sampling mass (sampling only)."})
    num_samples: int = dataclasses.field(default=1, metadata={"help": "Answers per question N; N > 1 also reports pass@N and maj@N (needs temperature > 0)."})
    batch_size: int = dataclasses.field(default=8, metadata={"help": "Questions per generate call."})
    seed: int = dataclasses.field(default=0, metadata={"help": "Sampling and bootstrap seed."})
    bootstrap_samples: int = dataclasses.field(default=1000, metadata={"help": "Bootstrap resamples for the 95 percent interval."})
    output_dir: str = dataclasses.field(default="outputs/eval", metadata={"help": "Where report.json and completions.jsonl are written."})

    def __post_init__(self) -> None:
        for name in ("limit", "max_new_tokens", "num_samples", "batch_size", "bootstrap_samples"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise UserError(f"key '{name}' must be at least 1, got {value}")
        self.check_decoding(self.num_samples, "num_samples")
        load_task(self.task)  # an unknown task is an error before any model is loaded


def bootstrap_interval(values: np.ndarray, samples: int = 1000, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values``."""
    rng = np.random.default_rng(seed)
    means = rng.choice(values, size=(samples, len(values)), replace=True).mean(axis=1)
    tail = (1 - level) / 2
    return float(np.quantile(means, tail)), float(np.quantile(means, 1 - tail))


def evaluate(model, tokenizer, config: EvalConfig, model_name: str) -> dict:
    """Generate answers for the task's rows, score them, write ``report.json`` + ``completions.jsonl``."""
    task = load_task(config.task)
    rows = load_task_rows(task, config.split, config.data_dir)[: config.limit]
    template = config.prompt or task.prompt
    sampling = config.sampling(config.max_new_tokens or task.max_new_tokens)
    prompts = [[{"role": "user", "content": template.replace("{question}", row["question"])}] for row in rows]
    engine = HFEngine(model, tokenizer, batch_size=config.batch_size, logits_processor=config.logits_processors(model, tokenizer))
    started = time.perf_counter()
    outputs = engine.generate(prompts, n=config.candidates_per_question(config.num_samples), sampling=sampling)
    wall_time = time.perf_counter() - started

    score = task_scorer(task)
    verdicts = [[score(c.text, row["answer"]) for c in group] for row, group in zip(rows, outputs)]
    kept, scores = config.select(prompts, outputs, verdicts, model, tokenizer, answers=config.num_samples)
    output_dir = Path(config.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    correct, formatted, passed, majority = [], [], [], []
    tokens = sum(len(c.token_ids) for group in outputs for c in group)
    with open(output_dir / "completions.jsonl", "w") as records:
        for index, row in enumerate(rows):
            completions = [outputs[index][j] for j in kept[index]]
            answers = [verdicts[index][j] for j in kept[index]]
            correct.append(answers[0].correct)
            formatted.append(answers[0].formatted)
            passed.append(any(v.correct for v in answers))
            votes = Counter(v.answer for v in answers if v.answer is not None)
            winner = votes.most_common(1)[0][0] if votes else None
            majority.append(any(v.correct for v in answers if winner is not None and v.answer == winner))
            record = {**row, "completions": [c.text for c in completions], "verdicts": [v._asdict() for v in answers]}
            if scores is not None:
                record["candidates"] = [{"text": c.text, "score": s, **v._asdict()} for c, s, v in zip(outputs[index], scores[index], verdicts[index])]
            records.write(json.dumps(record) + "\n")

    def summary(values: list[bool]) -> dict:
        array = np.asarray(values, dtype=float)
        low, high = bootstrap_interval(array, config.bootstrap_samples, config.seed)
        return {"mean": float(array.mean()), "ci95": [low, high], "count": int(array.sum())}

    report = {
        "protocol": {
            "model": model_name,
            "task": task.name,
            "split": config.split,
            "examples": len(rows),
            "prompt": template,
            "chat_template": True,
            "shots": 0,
            "decoding": dataclasses.asdict(sampling) | {"num_samples": config.num_samples} | config.decoding_record(),
            "scorer": task.scorer,
        },
        "metrics": {"first_sample": summary(correct), "answer_format": summary(formatted)}
        | ({f"pass@{config.num_samples}": summary(passed), f"maj@{config.num_samples}": summary(majority)} if config.num_samples > 1 else {}),
        "per_question": {"first_sample": [int(c) for c in correct], "answer_format": [int(f) for f in formatted]},
        "generated_tokens": tokens,
        "wall_time_s": round(wall_time, 2),
    }
    (output_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def format_report(report: dict) -> str:
    protocol = report["protocol"]
    lines = [f"{protocol['task']} {protocol['split']} · {protocol['examples']} questions · {protocol['model']} · "
             f"{'greedy' if protocol['decoding']['temperature'] == 0 else 'T=' + str(protocol['decoding']['temperature'])}"]
    for name, metric in report["metrics"].items():
        low, high = metric["ci95"]
        lines.append(f"  {name:>13}: {100 * metric['mean']:5.1f}%  (95% CI {100 * low:.1f}–{100 * high:.1f}%, {metric['count']}/{protocol['examples']})")
    lines.append(f"  {report['generated_tokens']} tokens generated in {report['wall_time_s']:.1f} s")
    return "\n".join(lines)
