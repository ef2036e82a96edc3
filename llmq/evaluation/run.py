"""``llmq eval``: model × task × decoding → accuracy with a 95% interval, and a resumable JSON report."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from pathlib import Path

from tqdm.auto import tqdm

from llmq.config import check_output_path
from llmq.data.tasks import TaskSpec, load_task, load_task_rows, task_scorer
from llmq.decoding.best_of_n import select_candidates
from llmq.decoding.guided import guidance_processors, load_guide
from llmq.decoding.options import DecodingOptions
from llmq.decoding.qstar import qstar_answer
from llmq.errors import UserError
from llmq.evaluation.report import score_records, write_reports
from llmq.models.features import weights_checksum
from llmq.models.prm import ProcessRewardModel
from llmq.models.qvm import load_qvm
from llmq.rollout import Completion
from llmq.rollout.engines import make_engine
from llmq.visualize import render_search_tree_html


@dataclasses.dataclass
class EvalConfig(DecodingOptions):
    """What to evaluate and how; every field can be a recipe key or a ``--flag``."""

    task: str = dataclasses.field(
        default="gsm8k", metadata={"help": "Task spec: a name in eval/ (gsm8k, math500) or a path to a task YAML."}
    )
    split: str = dataclasses.field(default="test", metadata={"help": "Dataset split."})
    data_dir: str | None = dataclasses.field(
        default=None,
        metadata={
            "help": "Folder with local copies (gsm8k/test.jsonl, math500/test.jsonl); default $LLMQ_DATA_DIR, else "
            "the Hugging Face Hub."
        },
    )
    limit: int | None = dataclasses.field(
        default=None, metadata={"help": "Evaluate only the first LIMIT rows (a fixed subset); default all."}
    )
    prompt: str | None = dataclasses.field(
        default=None, metadata={"help": "Override the task's prompt template ({question} is replaced)."}
    )
    max_new_tokens: int | None = dataclasses.field(
        default=None, metadata={"help": "Generation budget per answer; default the task's."}
    )
    temperature: float = dataclasses.field(default=0.0, metadata={"help": "0 = greedy decoding; > 0 samples."})
    top_p: float = dataclasses.field(default=1.0, metadata={"help": "Nucleus sampling mass (sampling only)."})
    num_samples: int = dataclasses.field(
        default=1,
        metadata={"help": "Answers per question N; N > 1 also reports pass@N and maj@N (needs temperature > 0)."},
    )
    batch_size: int = dataclasses.field(default=8, metadata={"help": "Questions per generate call."})
    seed: int = dataclasses.field(default=0, metadata={"help": "Sampling seed."})
    output_dir: str = dataclasses.field(
        default="outputs/eval",
        metadata={
            "help": "Where completions.jsonl (appended as batches finish: a killed run resumes here), report.json, "
            "report.md and accuracy_vs_tokens.png are written."
        },
    )
    compare_with: list[str] = dataclasses.field(
        default_factory=list,
        metadata={
            "help": "Output folders of other evaluations (e.g. other decodings) to include in report.md and the plot."
        },
    )

    def __post_init__(self) -> None:
        for name in ("limit", "max_new_tokens", "num_samples", "batch_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise UserError(f"key '{name}' must be at least 1, got {value}")
        self.check_decoding(self.num_samples, "num_samples")
        for other in self.compare_with:
            if not (Path(other) / "report.json").is_file():
                raise UserError(f"key 'compare_with': '{other}' holds no report.json")
        load_task(self.task)  # an unknown task is an error before any model is loaded
        check_output_path(self.output_dir, "output_dir")


def evaluate(model, tokenizer, config: EvalConfig, model_name: str, restart_on_mismatch: bool = False) -> dict:
    """Generate answers for the task's rows, score them, write ``report.json``, ``report.md`` and a plot.

    Resumable: each batch of questions is appended to ``completions.jsonl`` as it finishes, and a
    run in an ``output_dir`` that already holds completions of the same protocol (``protocol.json``:
    model and its weights, task, prompt, decoding) generates only the missing questions, with the
    same per-batch seeds, so the report equals that of an uninterrupted run.  Another protocol in
    the same folder is an error, or with ``restart_on_mismatch`` the old completions are discarded.
    ``model_name`` names the model in the report; with engine vllm or vllm_server it is also what
    the engine loads or must find served (a registry name, a directory or a Hub id).
    """
    task = load_task(config.task)
    rows = load_task_rows(task, config.split, config.data_dir)[: config.limit]
    protocol = _protocol(model, task, config, model_name, examples=len(rows))
    output_dir = Path(config.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    records = _cached_records(output_dir, protocol, restart_on_mismatch)
    _generate_missing(model, tokenizer, model_name, task, rows, records, config, output_dir)

    ordered = [records[row["index"]] for row in rows]
    selecting = config.decoding in ("best_of_n", "maj_at_n")
    report = {
        "protocol": protocol,
        **score_records(ordered, config.num_samples, config.num_candidates, selecting),
        "generated_tokens": sum(record["generated_tokens"] for record in ordered),
        "wall_time_s": round(sum(record["seconds"] for record in ordered), 2),
    }
    write_reports(report, output_dir, config.compare_with)
    return report


def _protocol(model, task: TaskSpec, config: EvalConfig, model_name: str, examples: int) -> dict:
    """What makes two evaluations comparable: model and weights, task, prompt, decoding, scorer."""
    sampling = config.sampling(config.max_new_tokens or task.max_new_tokens)
    protocol = {
        "model": model_name,
        "weights_checksum": weights_checksum(model),
        "task": task.name,
        "split": config.split,
        "examples": examples,
        "prompt": config.prompt or task.prompt,
        "chat_template": True,
        "shots": 0,
        "decoding": dataclasses.asdict(sampling)
        | {"num_samples": config.num_samples, "batch_size": config.batch_size}
        | config.decoding_record(),
        "scorer": task.scorer,
    }
    if task.reasoning_gym is not None:  # the generator and this split's seed and size define the questions
        generator = task.reasoning_gym
        protocol["generator"] = {
            "reasoning_gym": generator["dataset"],
            "config": generator["config"],
            "seed": generator["seeds"].get(config.split),
            "size": generator["sizes"].get(config.split),
        }
    return json.loads(json.dumps(protocol))  # as protocol.json will hold it (tuples become lists)


def _cached_records(output_dir: Path, protocol: dict, restart_on_mismatch: bool) -> dict[int, dict]:
    """The completions a previous run of the same protocol left in ``output_dir`` (by question index)."""
    protocol_file, cache = output_dir / "protocol.json", output_dir / "completions.jsonl"
    if protocol_file.is_file() or cache.is_file():
        # Completions without a protocol come from an older llmq: another protocol, to be safe.
        previous = json.loads(protocol_file.read_text()) if protocol_file.is_file() else {}
        if previous != protocol:
            if not restart_on_mismatch:
                differing = sorted(
                    key for key in protocol.keys() | previous.keys() if previous.get(key) != protocol.get(key)
                )
                raise UserError(
                    f"output_dir '{output_dir}' holds completions of another evaluation (differs in: "
                    f"{', '.join(differing)}); use another output_dir or delete it"
                )
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
                raise UserError(
                    f"{cache}, line {number}: not a completion record ({error!r}); delete the file to start over"
                ) from None
    return records


def _generate_missing(
    model,
    tokenizer,
    model_name: str,
    task: TaskSpec,
    rows: list[dict],
    records: dict[int, dict],
    config: EvalConfig,
    output_dir: Path,
) -> None:
    """Answer, score and select for every batch of questions with no record yet, appending each
    batch's records to ``completions.jsonl`` (and to ``records``) as it finishes."""
    batches = [
        list(range(start, min(start + config.batch_size, len(rows))))
        for start in range(0, len(rows), config.batch_size)
    ]
    todo = [
        (number, batch) for number, batch in enumerate(batches) if any(rows[i]["index"] not in records for i in batch)
    ]
    if not todo:  # a finished run needs no guide, QVM or engine (a vLLM server may be gone by now)
        return
    done = len(rows) - sum(len(batch) for _, batch in todo)
    template = config.prompt or task.prompt
    sampling = config.sampling(config.max_new_tokens or task.max_new_tokens)
    prompts = [[{"role": "user", "content": template.replace("{question}", row["question"])}] for row in rows]
    guide = load_guide(config, model, tokenizer) if config.guide_model else None
    qvm = load_qvm(config.qvm_path, model) if config.uses_qvm else None  # once: its checks read every weight
    prm = ProcessRewardModel(config.prm_path, config.prm_step_separator) if config.uses_prm else None
    engine = make_engine(
        config,
        model,
        tokenizer,
        model_name,
        batch_size=config.batch_size,
        progress=False,
        logits_processor=guidance_processors(config, tokenizer, guide),
    )
    score = task_scorer(task)
    with (
        contextlib.closing(engine),  # an in-process vLLM engine frees its memory for the next one
        open(output_dir / "completions.jsonl", "a") as cache,
        tqdm(total=len(rows), initial=done, desc=f"eval {task.name}", unit="question") as progress,
    ):
        for number, batch in todo:
            started = time.perf_counter()
            # The seed depends on the batch's place in the task, not on what was resumed.
            batch_sampling = dataclasses.replace(sampling, seed=sampling.seed + number)
            batch_prompts = [prompts[i] for i in batch]
            if config.decoding == "qstar":
                outputs, explored = _search_batch(
                    model,
                    tokenizer,
                    engine,
                    batch_prompts,
                    [rows[i]["index"] for i in batch],
                    config,
                    qvm,
                    prm,
                    batch_sampling,
                    output_dir,
                )
            else:
                outputs = engine.generate(
                    batch_prompts, n=config.candidates_per_question(config.num_samples), sampling=batch_sampling
                )
                explored = [sum(len(c.token_ids) for c in group) for group in outputs]
            verdicts = [[score(c.text, rows[i]["answer"]) for c in group] for i, group in zip(batch, outputs)]
            kept, scores = select_candidates(
                config,
                batch_prompts,
                outputs,
                verdicts,
                model,
                tokenizer,
                answers=config.num_samples,
                guide=guide,
                qvm=qvm,
                prm=prm,
            )
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
                    record["candidates"] = [
                        {"text": c.text, "score": s, **v._asdict()}
                        for c, s, v in zip(outputs[k], scores[k], verdicts[k])
                    ]
                records[rows[i]["index"]] = record
                cache.write(json.dumps(record) + "\n")
            cache.flush()
            progress.update(len(batch))


def _search_batch(
    model,
    tokenizer,
    engine,
    prompts: list,
    indices: list[int],
    config: EvalConfig,
    qvm,
    prm: ProcessRewardModel | None,
    sampling,
    output_dir: Path,
) -> tuple[list, list[int]]:
    """Q* answers for a batch of questions (one search each); each question's search tree is also
    written to ``output_dir/search_trees/{index}.html``."""
    heads, metadata = qvm
    outputs, explored = [], []
    (output_dir / "search_trees").mkdir(exist_ok=True)
    for offset, (prompt, index) in enumerate(zip(prompts, indices)):
        text = engine.render(prompt)
        question = prompt[-1]["content"] if isinstance(prompt, list) else prompt
        answer, tokens, result = qstar_answer(
            model,
            tokenizer,
            engine,
            text,
            heads,
            layer=metadata["layer"],
            delimiter=metadata["delimiter"],
            budget=config.search_budget,
            num_candidates=config.search_candidates,
            lam=config.search_lambda,
            heuristic=config.search_heuristic,
            max_depth=config.search_max_depth,
            step_max_tokens=config.step_max_tokens,
            temperature=config.temperature,
            seed=sampling.seed * 1000 + offset,
            utility=config.search_utility,
            aggregate=config.search_aggregate,
            prm=prm,
            question=question,
            finish_within=sampling.max_new_tokens if config.search_finish == "rollout" else None,
        )
        if config.search_finish == "rollout":  # unfinished only where the rollout ran into max_new_tokens
            ended = len(tokenizer(answer, add_special_tokens=False)["input_ids"]) < sampling.max_new_tokens
        else:
            ended = result.best.terminal
        outputs.append(
            [Completion(text=answer, token_ids=[], logprobs=[], finish_reason="stop" if ended else "length")]
        )
        explored.append(tokens)
        tree = render_search_tree_html(
            result.nodes,
            [node.id for node in result.path()],
            title=f"Q* search, question {index} ({result.expansions} expansions)",
            prompt=question,
            step_text=lambda step: step.text,
        )
        (output_dir / "search_trees" / f"{index}.html").write_text(tree)
    return outputs, explored
