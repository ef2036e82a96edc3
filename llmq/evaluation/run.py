"""``llmq eval``: model × task × decoding → accuracy with a bootstrap 95% interval, and a JSON report."""

from __future__ import annotations

import dataclasses
import json
import time
from collections import Counter
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from llmq.data.tasks import load_task, load_task_rows, task_scorer
from llmq.decoding.options import DecodingOptions
from llmq.errors import UserError
from llmq.models.features import weights_checksum
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
    output_dir: str = dataclasses.field(
        default="outputs/eval",
        metadata={"help": "Where completions.jsonl (appended as batches finish: a killed run resumes here), report.json, report.md and accuracy_vs_tokens.png are written."},
    )
    compare_with: list[str] = dataclasses.field(
        default_factory=list, metadata={"help": "Output folders of other evaluations (e.g. other decodings) to include in report.md and the plot."}
    )

    def __post_init__(self) -> None:
        for name in ("limit", "max_new_tokens", "num_samples", "batch_size", "bootstrap_samples"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise UserError(f"key '{name}' must be at least 1, got {value}")
        self.check_decoding(self.num_samples, "num_samples")
        for other in self.compare_with:
            if not (Path(other) / "report.json").is_file():
                raise UserError(f"key 'compare_with': '{other}' holds no report.json")
        load_task(self.task)  # an unknown task is an error before any model is loaded


def bootstrap_interval(values: np.ndarray, samples: int = 1000, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values``."""
    rng = np.random.default_rng(seed)
    means = rng.choice(values, size=(samples, len(values)), replace=True).mean(axis=1)
    tail = (1 - level) / 2
    return float(np.quantile(means, tail)), float(np.quantile(means, 1 - tail))


def pass_at_k(samples: int, correct: int, k: int) -> float:
    """The unbiased estimate of pass@k from ``correct`` of ``samples`` answers (Chen et al. 2021):
    the chance that ``k`` answers drawn without replacement include a correct one."""
    if samples - correct < k:
        return 1.0
    return 1.0 - float(np.prod(1.0 - k / np.arange(samples - correct + 1, samples + 1)))


def _cached_records(output_dir: Path, protocol: dict, restart_on_mismatch: bool) -> dict[int, dict]:
    """The completions a previous run of the same protocol left in ``output_dir`` (by question index)."""
    protocol_file, cache = output_dir / "protocol.json", output_dir / "completions.jsonl"
    if protocol_file.is_file() or cache.is_file():
        # Completions without a protocol come from an older llmq: another protocol, to be safe.
        previous = json.loads(protocol_file.read_text()) if protocol_file.is_file() else {}
        if previous != protocol:
            if not restart_on_mismatch:
                differing = sorted(key for key in protocol.keys() | previous.keys() if previous.get(key) != protocol.get(key))
                raise UserError(f"output_dir '{output_dir}' holds completions of another evaluation (differs in: {', '.join(differing)}); use another output_dir or delete it")
            cache.unlink(missing_ok=True)
    protocol_file.write_text(json.dumps(protocol, indent=2) + "\n")
    records: dict[int, dict] = {}
    if cache.is_file():
        text = cache.read_text()
        if not text.endswith("\n"):  # a kill in the middle of a write: drop the cut line before appending
            text = text[: text.rfind("\n") + 1]
            cache.write_text(text)
        for number, line in enumerate(text.splitlines(), start=1):
            try:
                record = json.loads(line)
                records[record["index"]] = record
            except (json.JSONDecodeError, KeyError, TypeError) as error:
                raise UserError(f"{cache}, line {number}: not a completion record ({error!r}); delete the file to start over") from None
    return records


def evaluate(model, tokenizer, config: EvalConfig, model_name: str, restart_on_mismatch: bool = False) -> dict:
    """Generate answers for the task's rows, score them, write ``report.json``, ``report.md`` and a plot.

    Resumable: each batch of questions is appended to ``completions.jsonl`` as it finishes, and a
    run in an ``output_dir`` that already holds completions of the same protocol (``protocol.json``:
    model and its weights, task, prompt, decoding) generates only the missing questions, with the
    same per-batch seeds, so the report equals that of an uninterrupted run.  Another protocol in
    the same folder is an error, or with ``restart_on_mismatch`` the old completions are discarded.
    """
    task = load_task(config.task)
    rows = load_task_rows(task, config.split, config.data_dir)[: config.limit]
    template = config.prompt or task.prompt
    sampling = config.sampling(config.max_new_tokens or task.max_new_tokens)
    prompts = [[{"role": "user", "content": template.replace("{question}", row["question"])}] for row in rows]
    protocol = {
        "model": model_name,
        "weights_checksum": weights_checksum(model),
        "task": task.name,
        "split": config.split,
        "examples": len(rows),
        "prompt": template,
        "chat_template": True,
        "shots": 0,
        "decoding": dataclasses.asdict(sampling) | {"num_samples": config.num_samples, "batch_size": config.batch_size} | config.decoding_record(),
        "scorer": task.scorer,
    }
    protocol = json.loads(json.dumps(protocol))  # as protocol.json will hold it (tuples become lists)
    output_dir = Path(config.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    records = _cached_records(output_dir, protocol, restart_on_mismatch)

    guide = config.load_guide(model, tokenizer) if config.guide_model else None
    qvm = None
    if config.decoding == "qstar":
        from llmq.qvm import load_qvm

        qvm = load_qvm(config.qvm_path)
    engine = HFEngine(model, tokenizer, batch_size=config.batch_size, progress=False, logits_processor=config.logits_processors(model, tokenizer, guide))
    score = task_scorer(task)
    batches = [list(range(start, min(start + config.batch_size, len(rows)))) for start in range(0, len(rows), config.batch_size)]
    todo = [(number, batch) for number, batch in enumerate(batches) if any(rows[i]["index"] not in records for i in batch)]
    done = len(rows) - sum(len(batch) for _, batch in todo)
    with open(output_dir / "completions.jsonl", "a") as cache, tqdm(total=len(rows), initial=done, desc=f"eval {task.name}", unit="question") as progress:
        for number, batch in todo:
            started = time.perf_counter()
            # The seed depends on the batch's place in the task, not on what was resumed.
            batch_sampling = dataclasses.replace(sampling, seed=sampling.seed + number)
            if config.decoding == "qstar":
                outputs, explored = _search_batch(model, tokenizer, engine, [prompts[i] for i in batch], [rows[i]["index"] for i in batch], config, qvm, batch_sampling, output_dir)
            else:
                outputs = engine.generate([prompts[i] for i in batch], n=config.candidates_per_question(config.num_samples), sampling=batch_sampling)
                explored = [sum(len(c.token_ids) for c in group) for group in outputs]
            verdicts = [[score(c.text, rows[i]["answer"]) for c in group] for i, group in zip(batch, outputs)]
            kept, scores = config.select([prompts[i] for i in batch], outputs, verdicts, model, tokenizer, answers=config.num_samples, guide=guide)
            seconds = (time.perf_counter() - started) / len(batch)
            for k, i in enumerate(batch):
                record = {
                    **rows[i],
                    "completions": [outputs[k][j].text for j in kept[k]],
                    "verdicts": [verdicts[k][j]._asdict() for j in kept[k]],
                    "generated_tokens": explored[k],
                    "seconds": seconds,
                }
                if scores is not None:
                    record["candidates"] = [{"text": c.text, "score": s, **v._asdict()} for c, s, v in zip(outputs[k], scores[k], verdicts[k])]
                records[rows[i]["index"]] = record
                cache.write(json.dumps(record) + "\n")
            cache.flush()
            progress.update(len(batch))

    ordered = [records[row["index"]] for row in rows]
    correct, formatted, passed, majority = [], [], [], []
    for record in ordered:
        answers = record["verdicts"]
        correct.append(answers[0]["correct"])
        formatted.append(answers[0]["formatted"])
        passed.append(any(v["correct"] for v in answers))
        votes = Counter(v["answer"] for v in answers if v["answer"] is not None)
        winner = votes.most_common(1)[0][0] if votes else None
        majority.append(any(v["correct"] for v in answers if winner is not None and v["answer"] == winner))

    def summary(values: list[bool]) -> dict:
        array = np.asarray(values, dtype=float)
        low, high = bootstrap_interval(array, config.bootstrap_samples, config.seed)
        return {"mean": float(array.mean()), "ci95": [low, high], "count": int(array.sum())}

    # pass@k of the sampler for every k up to its N answers: an accuracy at k answers' tokens.
    # Best-of-N and maj@N keep the verdicts of all their candidates, and those are the sampler's.
    selecting = config.decoding in ("best_of_n", "maj_at_n")
    sampled = [[c["correct"] for c in record["candidates"]] if selecting else [v["correct"] for v in record["verdicts"]] for record in ordered]
    answers_per_question = min(len(group) for group in sampled)
    curve = {}
    for k in range(1, answers_per_question + 1 if answers_per_question > 1 else 1):
        estimates = np.array([pass_at_k(len(group), sum(group), k) for group in sampled])
        low, high = bootstrap_interval(estimates, config.bootstrap_samples, config.seed)
        curve[str(k)] = {"mean": float(estimates.mean()), "ci95": [low, high]}
    metrics = {"first_sample": summary(correct), "answer_format": summary(formatted)}
    if config.num_samples > 1:
        metrics |= {f"pass@{config.num_samples}": summary(passed), f"maj@{config.num_samples}": summary(majority)}
    if selecting:
        metrics[f"candidates_pass@{config.num_candidates}"] = summary([any(group) for group in sampled])
    report = {
        "protocol": protocol,
        "metrics": metrics,
        "pass_at_k": curve,
        "per_question": {"first_sample": [int(c) for c in correct], "answer_format": [int(f) for f in formatted]},
        "generated_tokens": sum(record["generated_tokens"] for record in ordered),
        "wall_time_s": round(sum(record["seconds"] for record in ordered), 2),
    }
    (output_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    reports = [report] + [json.loads((Path(other) / "report.json").read_text()) for other in config.compare_with]
    (output_dir / "report.md").write_text(format_markdown(reports))
    plot_accuracy_vs_tokens(reports, output_dir / "accuracy_vs_tokens.png")
    return report


def _search_batch(model, tokenizer, engine, prompts: list, indices: list[int], config: EvalConfig, qvm, sampling, output_dir: Path) -> tuple[list, list[int]]:
    """Q* answers for a batch of questions (one search each); the first question's tree is also
    written to ``output_dir/search_tree.html``."""
    from llmq.decoding.qstar import qstar_answer
    from llmq.rollout import Completion
    from llmq.visualize import render_search_tree_html

    heads, metadata = qvm
    outputs, explored = [], []
    for offset, (prompt, index) in enumerate(zip(prompts, indices)):
        text = engine.render(prompt)
        answer, tokens, result = qstar_answer(
            model, tokenizer, engine, text, heads, layer=metadata["layer"], delimiter=metadata["delimiter"], budget=config.search_budget,
            num_candidates=config.search_candidates, lam=config.search_lambda, heuristic=config.search_heuristic, max_depth=config.search_max_depth,
            step_max_tokens=config.step_max_tokens, temperature=config.temperature, seed=sampling.seed * 1000 + offset,
        )  # fmt: skip
        outputs.append([Completion(text=answer, token_ids=[], logprobs=[], finish_reason="stop" if result.best.terminal else "length")])
        explored.append(tokens)
        if index == 0:
            tree = render_search_tree_html(result.nodes, [node.id for node in result.path()], title=f"Q* search, question 0 ({result.expansions} expansions)",
                                           prompt=prompt[-1]["content"] if isinstance(prompt, list) else prompt, step_text=lambda step: step.text)  # fmt: skip
            (output_dir / "search_tree.html").write_text(tree)
    return outputs, explored


def decoding_label(report: dict) -> str:
    """A short name of a report's decoding, e.g. ``greedy``, ``T=0.7 ×8``, ``beam 4``, ``best_of_n 8 (implicit_reward)``."""
    decoding = report["protocol"]["decoding"]
    mode = decoding.get("decoding", "sample")
    if mode == "beam":
        label = f"beam {decoding['num_beams']}"
    elif mode == "qstar":
        label = f"Q* (K={decoding['search_candidates']}, budget {decoding['search_budget']})"
    elif mode in ("best_of_n", "maj_at_n"):
        label = f"{mode} {decoding['num_candidates']} ({decoding['scorer']})"
    elif decoding["temperature"] == 0 or mode == "greedy":
        label = "greedy"
    else:
        label = f"T={decoding['temperature']}"
    if decoding.get("guide_model") and mode in ("guided", "beam"):
        label += f", guided by {Path(decoding['guide_model']).name} (β_dec={decoding['guidance_beta'] or decoding['guide_beta']})"
    if decoding["num_samples"] > 1:
        label += f" ×{decoding['num_samples']}"
    return label


def format_markdown(reports: list[dict]) -> str:
    """A Markdown summary: the protocol of the first report and one metrics row per report."""
    protocol = reports[0]["protocol"]
    lines = [
        f"# {protocol['task']} {protocol['split']}: {protocol['model']}",
        "",
        f"{protocol['examples']} questions, 0-shot chat prompt, scorer `{protocol['scorer']}`, "
        f"at most {protocol['decoding']['max_new_tokens']} new tokens.",
        "",
        "```",
        protocol["prompt"],
        "```",
        "",
        "| model | decoding | metric | accuracy | 95% CI | correct | tokens / question | wall s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for report in reports:
        examples = report["protocol"]["examples"]
        for name, metric in report["metrics"].items():
            low, high = metric["ci95"]
            lines.append(
                f"| {report['protocol']['model']} | {decoding_label(report)} | {name} | {100 * metric['mean']:.1f}% | {100 * low:.1f}–{100 * high:.1f}% "
                f"| {metric['count']}/{examples} | {report['generated_tokens'] / examples:.0f} | {report['wall_time_s']:.0f} |"
            )
    for report in reports:
        if report.get("pass_at_k"):
            curve = ", ".join(f"k={k}: {100 * value['mean']:.1f}%" for k, value in report["pass_at_k"].items())
            lines.append(f"\npass@k of the sampled answers of {report['protocol']['model']}, {decoding_label(report)} (unbiased estimate, Chen et al. 2021): {curve}")
    return "\n".join(lines) + "\n"


def plot_accuracy_vs_tokens(reports: list[dict], path: Path) -> None:
    """Accuracy (first sample, with its 95% interval) against tokens generated per question, one point per report;
    a sampler's pass@k as a dashed line at k answers' tokens, so a search can be read against sampling at equal tokens."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4.5), dpi=120)
    axes = figure.add_subplot()
    curves_drawn = set()
    for report in reports:
        metric, examples = report["metrics"]["first_sample"], report["protocol"]["examples"]
        x, y = report["generated_tokens"] / examples, 100 * metric["mean"]
        low, high = (100 * bound for bound in metric["ci95"])
        axes.errorbar([x], [y], yerr=[[y - low], [high - y]], fmt="o", capsize=4, label=f"{report['protocol']['model']}: {decoding_label(report)}")
        curve = tuple(100 * point["mean"] for point in report.get("pass_at_k", {}).values())
        if curve and curve not in curves_drawn:  # best-of-N and maj@N share their sampler's curve
            curves_drawn.add(curve)
            tokens_per_answer = x / len(curve)
            axes.plot([tokens_per_answer * k for k in range(1, len(curve) + 1)], curve, "--", alpha=0.7, label=f"pass@k of the T={report['protocol']['decoding']['temperature']} sampler, k = 1…{len(curve)}")
    protocol = reports[0]["protocol"]
    axes.set_xlabel("tokens generated per question (all samples)")
    axes.set_ylabel("accuracy, first answer (%)")
    axes.set_title(f"{protocol['task']} {protocol['split']}, {protocol['examples']} questions (95% bootstrap CI)", fontsize=10)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7, loc="best")
    figure.tight_layout()
    FigureCanvasAgg(figure).print_png(str(path))


def format_report(report: dict) -> str:
    protocol = report["protocol"]
    lines = [f"{protocol['task']} {protocol['split']} · {protocol['examples']} questions · {protocol['model']} · "
             f"{'greedy' if protocol['decoding']['temperature'] == 0 else 'T=' + str(protocol['decoding']['temperature'])}"]
    for name, metric in report["metrics"].items():
        low, high = metric["ci95"]
        lines.append(f"  {name:>13}: {100 * metric['mean']:5.1f}%  (95% CI {100 * low:.1f}–{100 * high:.1f}%, {metric['count']}/{protocol['examples']})")
    lines.append(f"  {report['generated_tokens']} tokens generated in {report['wall_time_s']:.1f} s of generation")
    return "\n".join(lines)
