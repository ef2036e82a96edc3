"""``llmq train`` with ``method: qvm``: a Q-value model for Q* search from ground-truth answers only (§4.4).

1. the frozen policy samples ``trajectories`` solutions per training question; each is cut into
   steps at ``delimiter`` (a state is the question plus the steps so far, an action the next step);
2. labels (reward 1 for a correct final answer, γ = 1):
   * ``rollout`` (§4.4 item 2): the best outcome among the trajectory's own continuation and
     ``rollouts`` more completions sampled from the state after the step, each with the tokens the
     solution's ``max_new_tokens`` left — a Monte-Carlo lower estimate of ``Q_hard`` that tightens
     as ``rollouts`` grows;
   * ``fqi`` (§4.4 item 1): ``y = max_c Q_prev(s', c)`` over ``fqi_candidates`` proposed next steps
     (the outcome itself after a final step), refitted ``fqi_iterations`` times from rollout labels;
3. the QVM is :class:`llmq.models.value_heads.CriticHeads` on frozen features of (state, step),
   read through the state's KV cache, fitted by regression (:class:`~llmq.trainers.critic.CriticTrainer` with
   every transition terminal: its Q target is then exactly the label).

``label_model`` samples the solutions and rollouts from a stronger policy than the base model (the QVM still
reads the base model's features); ``stepwise_dataset`` takes step labels in TRL's stepwise-supervision format
instead, and every run writes its own labels in that format (``stepwise.jsonl``), for TRL's PRMTrainer.  With
``heldout_questions`` the fitted QVM ranks the base model's answers to further questions: its within-question
pairwise accuracy of right over wrong answers goes to ``summary.json``.

The heads are saved in ``output_dir`` (``model.safetensors`` + ``qvm.json``, :func:`llmq.models.qvm.save_qvm`)
for ``llmq eval --decoding qstar``.  The labelled steps are recorded as a stage (``labels.json``): a
killed run resumed with ``--resume`` does not sample them again.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import datasets
import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import TrainingArguments

from llmq.config import ModelConfig, mirror
from llmq.data.tasks import load_task, load_task_rows, task_scorer
from llmq.decoding.best_of_n import qvm_scores
from llmq.decoding.qstar import LLMStepProposer
from llmq.errors import UserError
from llmq.launch import LaunchConfig
from llmq.losses import fqi_labels, rollout_max_labels
from llmq.methods import method_field
from llmq.methods.stages import StageLedger, write_summary
from llmq.models import load_from_config, load_model, load_tokenizer
from llmq.models.features import score_continuations
from llmq.models.qvm import FeatureQVM, ReasoningStep, save_qvm, split_steps, weights_checksum
from llmq.models.value_heads import CriticHeads
from llmq.rollout import Engine, SamplingParams
from llmq.rollout.engines import EngineConfig, make_engine
from llmq.stats import within_question_ranking
from llmq.trainers.critic import CriticConfig, CriticTrainer, critic_config

LABELS_FILE = "labels.json"
STEPWISE_FILE = "stepwise.jsonl"  # the labels in TRL's stepwise-supervision format


@dataclasses.dataclass
class Config(EngineConfig):
    """Where the QVM's training data come from (sampled by ``engine``) and how the heads are fitted;
    the heads read the policy's features through transformers whatever the engine."""

    method: str = method_field("qvm")
    task: str = dataclasses.field(
        default="gsm8k", metadata={"help": "Task whose training questions and gold answers give the labels."}
    )
    split: str = dataclasses.field(default="train", metadata={"help": "Split of the questions."})
    data_dir: str | None = dataclasses.field(
        default=None, metadata={"help": "Local dataset folder; default $LLMQ_DATA_DIR, else the Hub."}
    )
    limit: int = dataclasses.field(default=64, metadata={"help": "First N questions."})
    trajectories: int = dataclasses.field(default=2, metadata={"help": "Solutions sampled per question."})
    rollouts: int = dataclasses.field(
        default=4, metadata={"help": "Completions sampled after each step for its rollout label."}
    )
    label: str = dataclasses.field(
        default="rollout",
        metadata={
            "help": "rollout (best of the completions) or fqi (fitted Q iteration from them).",
            "choices": ["rollout", "fqi"],
        },
    )
    fqi_iterations: int = dataclasses.field(
        default=2, metadata={"help": "Refits with bootstrapped labels (label fqi)."}
    )
    fqi_candidates: int = dataclasses.field(
        default=4, metadata={"help": "Proposed next steps per state in the FQI max (label fqi)."}
    )
    label_model: str | None = dataclasses.field(
        default=None,
        metadata={
            "help": "The model that samples the solutions and rollouts the labels come from: a stronger sampler "
            "than the base model (e.g. the ShiQ-trained policy) gives more right answers to learn from. It must "
            "share the base model's tokenizer; the QVM still reads the base model's features. Default: the base "
            "model. Recorded in qvm.json."
        },
    )
    stepwise_dataset: str | None = dataclasses.field(
        default=None,
        metadata={
            "help": "Fit on step labels in TRL's stepwise-supervision format (columns prompt, completions, labels; "
            "a .jsonl/.json file or a Hub dataset's train split) instead of sampling them: a step marked true is "
            "labelled 1, else 0. Every run writes its own labels in that format to output_dir/stepwise.jsonl."
        },
    )
    heldout_questions: int = dataclasses.field(
        default=0,
        metadata={
            "help": "Questions after the first `limit` of `split` on which the fitted QVM ranks heldout_answers "
            "answers of the base model each: the within-question pairwise accuracy (AUC) of right over wrong, "
            "with its interval, in summary.json. 0: none."
        },
    )
    heldout_answers: int = dataclasses.field(default=8, metadata={"help": "Answers per held-out question."})
    delimiter: str = dataclasses.field(default="\n", metadata={"help": "Text that ends a reasoning step."})
    max_new_tokens: int = dataclasses.field(
        default=256, metadata={"help": "Tokens per sampled solution or completion."}
    )
    sampling_temperature: float = dataclasses.field(
        default=0.8, metadata={"help": "Temperature of solutions, completions and proposals."}
    )
    feature_layer: int | None = dataclasses.field(
        default=None, metadata={"help": "Hidden-state index of the features; default the middle layer."}
    )
    qvm_steps: int = dataclasses.field(default=1000, metadata={"help": "Optimizer steps per fit."})
    qvm_learning_rate: float = mirror(CriticConfig, "learning_rate")
    qvm_batch_size: int = dataclasses.field(default=64, metadata={"help": "Labelled steps per optimizer step."})
    qvm_hidden_size: int = mirror(CriticConfig, "hidden_size")
    qvm_layers: int = mirror(CriticConfig, "num_layers")
    generation_batch_size: int = dataclasses.field(default=8, metadata={"help": "Prompts per generate call."})

    def __post_init__(self) -> None:
        self.check_engine()
        for name in (
            "limit",
            "trajectories",
            "rollouts",
            "fqi_iterations",
            "fqi_candidates",
            "max_new_tokens",
            "qvm_steps",
            "qvm_batch_size",
        ):
            if getattr(self, name) < 1:
                raise UserError(f"key '{name}' must be at least 1, got {getattr(self, name)}")
        if not 0 < self.sampling_temperature < math.inf:
            raise UserError(
                "key 'sampling_temperature' must be > 0 (the labels need sampled continuations), got "
                f"{self.sampling_temperature}"
            )
        if not self.delimiter:
            raise UserError("key 'delimiter' must not be empty")
        if self.heldout_questions < 0 or self.heldout_answers < 2:
            raise UserError(
                "key 'heldout_questions' must be >= 0 and 'heldout_answers' >= 2 (a ranking needs two answers)"
            )
        if self.stepwise_dataset is not None and (self.label == "fqi" or self.label_model is not None):
            raise UserError(
                "key 'stepwise_dataset' gives the labels: label fqi and label_model need sampled solutions instead"
            )


def config_types(method: str) -> tuple[type, type]:
    """The critic's optimisation settings come from ``TrainingArguments`` (device, seed, logging); the run's config."""
    return TrainingArguments, Config


@dataclasses.dataclass(frozen=True)
class LabelledStep:
    """One step of a sampled solution: the question's index, the steps before it, the step, and
    the outcome (1 correct, 0 not) of the solution it belongs to."""

    question: int
    before: tuple[ReasoningStep, ...]
    step: ReasoningStep
    outcome: float
    last: bool


def sample_steps(
    engine: Engine,
    tokenizer,
    prompts: list[str],
    questions: list[dict],
    score,
    run: Config,
    sampling: SamplingParams,
) -> list[LabelledStep]:
    """``trajectories`` solutions per question, cut into steps at ``delimiter``."""
    eos = {tokenizer.eos_token_id}
    items = []
    for index, (question, group) in enumerate(
        zip(questions, engine.generate(prompts, n=run.trajectories, sampling=sampling))
    ):
        for completion in group:
            steps = split_steps(completion.text, run.delimiter)
            ended = bool(completion.token_ids) and completion.token_ids[-1] in eos
            outcome = float(score(completion.text, question["answer"]).correct)
            for t, step in enumerate(steps):
                last = t == len(steps) - 1
                items.append(
                    LabelledStep(
                        index,
                        tuple(ReasoningStep(s, False) for s in steps[:t]),
                        ReasoningStep(step, last and ended),
                        outcome,
                        last,
                    )
                )
    return items


def rollout_labels(
    engine: Engine,
    tokenizer,
    prompts: list[str],
    questions: list[dict],
    score,
    items: list[LabelledStep],
    run: Config,
    sampling: SamplingParams,
    seed: int,
) -> list[float]:
    """The best outcome among a step's own continuation and ``rollouts`` more (§4.4 item 2).

    A continuation gets the tokens the solution's budget left after the step, as the trajectory's
    own did; steps with similar budgets share a generate call, which runs to its largest budget.
    """
    open_items = [i for i, item in enumerate(items) if not item.last]
    written = {i: "".join(s.text for s in items[i].before) + items[i].step.text for i in open_items}
    budget = {
        i: max(1, run.max_new_tokens - len(tokenizer(written[i], add_special_tokens=False)["input_ids"]))
        for i in open_items
    }
    by_budget = sorted(open_items, key=lambda i: -budget[i])
    outcomes: dict[int, list[float]] = {}
    for number, start in enumerate(
        tqdm(range(0, len(by_budget), run.generation_batch_size), desc="rollouts", unit="batch")
    ):
        chunk = by_budget[start : start + run.generation_batch_size]
        chunk_sampling = dataclasses.replace(sampling, seed=seed + 1 + number, max_new_tokens=budget[chunk[0]])
        for i, group in zip(
            chunk,
            engine.generate(
                [prompts[items[i].question] + written[i] for i in chunk], n=run.rollouts, sampling=chunk_sampling
            ),
        ):
            outcomes[i] = [
                float(score(written[i] + c.text, questions[items[i].question]["answer"]).correct) for c in group
            ]
    # Reward comes at the end only: a step's own reward is 0 and its continuations include the trajectory's own.
    return rollout_max_labels(
        [0.0] * len(items), [[item.outcome, *outcomes.get(i, [])] for i, item in enumerate(items)]
    )


def step_features(
    model, tokenizer, prompts: list[str], items: list[LabelledStep], layer: int | None, cache_dir: Path
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Frozen (state, step) features of every item; each state is read once, its steps through the KV cache."""
    by_state: dict[tuple[int, tuple], list[int]] = {}
    for i, item in enumerate(items):
        by_state.setdefault((item.question, item.before), []).append(i)
    keys = list(by_state)
    states = [prompts[question] + "".join(s.text for s in before) for question, before in keys]
    state_features, steps_features, _ = score_continuations(
        model,
        tokenizer,
        states,
        [[items[i].step.text for i in by_state[key]] for key in keys],
        layer=layer,
        cache_dir=cache_dir,
    )
    features: list = [None] * len(items)
    for key, state_feature, step_feature in zip(keys, state_features, steps_features):
        for i, feature in zip(by_state[key], step_feature):
            features[i] = (state_feature, feature)
    return features


def fit_heads(
    features: list[tuple[torch.Tensor, torch.Tensor]],
    labels: list[float],
    run: Config,
    training_args: TrainingArguments,
    output_dir: Path,
) -> CriticHeads:
    """Regress Q heads on (state, step) features to ``labels``; returns the fitted :class:`CriticHeads`."""
    rows = [
        {
            "state_features": s.tolist(),
            "action_features": a.tolist(),
            "next_state_features": s.tolist(),
            "reward": float(y),
            "done": True,
        }
        for (s, a), y in zip(features, labels)
    ]
    args = critic_config(
        training_args,
        str(output_dir),
        run.qvm_steps,
        gamma=1.0,
        target_update_rate=1.0,
        hidden_size=run.qvm_hidden_size,
        num_layers=run.qvm_layers,
        learning_rate=run.qvm_learning_rate,
        per_device_train_batch_size=run.qvm_batch_size,
    )
    trainer = CriticTrainer(args=args, train_dataset=datasets.Dataset.from_list(rows))
    trainer.train()
    return trainer.model.online.cpu().eval()


def fqi_refit(
    model,
    tokenizer,
    engine: Engine,
    prompts: list[str],
    items: list[LabelledStep],
    features: list,
    labels: list[float],
    heads: CriticHeads,
    run: Config,
    training_args: TrainingArguments,
    output_dir: Path,
) -> tuple[CriticHeads, list[float]]:
    """Fitted Q iteration (§4.4 item 1): ``y(s, a) = max_c Q_prev(s', c)`` over proposed next steps
    ``c`` at ``s' = s ⊕ a`` (the outcome itself after a final step), refitted ``fqi_iterations`` times."""
    eos = {tokenizer.eos_token_id}
    open_items = [i for i, item in enumerate(items) if not item.last]
    for iteration in range(run.fqi_iterations):
        new_labels = list(labels)
        for index in sorted({item.question for item in items}):
            qvm = FeatureQVM(model, tokenizer, heads, prompts[index], layer=run.feature_layer)
            proposer = LLMStepProposer(
                engine,
                prompts[index],
                eos,
                delimiter=run.delimiter,
                max_step_tokens=run.max_new_tokens,
                temperature=run.sampling_temperature,
                seed=training_args.seed + 100 * (iteration + 1),
            )
            mine = [i for i in open_items if items[i].question == index]
            next_states = [items[i].before + (items[i].step,) for i in mine]
            next_q = [
                qvm([(state, c) for c in candidates])
                for state, candidates in zip(next_states, proposer(next_states, run.fqi_candidates) if mine else [])
            ]
            # Labels of a 0/1 outcome stay in [0, 1] whatever the current heads extrapolate.
            for i, label in zip(mine, fqi_labels([0.0] * len(mine), [False] * len(mine), next_q)):
                new_labels[i] = float(np.clip(label, 0.0, 1.0))
        labels = new_labels
        heads = fit_heads(features, labels, run, training_args, output_dir / f"fit_fqi{iteration + 1}")
    return heads, labels


def stepwise_rows(questions: list[str], items: list[LabelledStep], labels: list[float], delimiter: str) -> list[dict]:
    """The labelled solutions in TRL's stepwise-supervision format: ``prompt`` (the question), ``completions``
    (the steps, without their delimiter) and ``labels`` (a step is good when its label is above ½: with rollout
    labels, when a continuation from it reached the right answer)."""
    rows: list[dict] = []
    for item, label in zip(items, labels):
        if not item.before:  # each solution's first step starts a row
            rows.append({"prompt": questions[item.question], "completions": [], "labels": []})
        rows[-1]["completions"].append(item.step.text.removesuffix(delimiter))
        rows[-1]["labels"].append(bool(label > 0.5))
    return rows


def read_stepwise(source: str, delimiter: str) -> tuple[list[str], list[LabelledStep], list[float]]:
    """Questions, steps and 0/1 labels of a stepwise-supervision dataset (``prompt``, ``completions``, ``labels``):
    a local .jsonl/.json file or a Hub dataset's train split. Each row is one solution of its own question."""
    try:
        if Path(source).suffix in (".jsonl", ".json"):
            dataset = datasets.load_dataset("json", data_files=source, split="train")
        else:
            dataset = datasets.load_dataset(source, split="train")
    except Exception as error:  # noqa: BLE001  missing file, unreachable Hub, bad JSON: one line naming the source
        raise UserError(f"key 'stepwise_dataset': cannot load '{source}' ({type(error).__name__}: {error})") from None
    missing = {"prompt", "completions", "labels"} - set(dataset.column_names)
    if missing:
        raise UserError(
            f"key 'stepwise_dataset': '{source}' lacks the column(s) {', '.join(sorted(missing))} of TRL's "
            "stepwise-supervision format (prompt, completions, labels)"
        )
    questions, items, labels = [], [], []
    for number, row in enumerate(dataset):
        steps, marks = row["completions"], row["labels"]
        if not isinstance(row["prompt"], str) or not steps or len(steps) != len(marks):
            raise UserError(
                f"key 'stepwise_dataset': '{source}', row {number}: needs a text prompt and as many labels as "
                f"completions (at least one), got {len(steps)} completions and {len(marks)} labels"
            )
        texts = [step + delimiter for step in steps[:-1]] + [steps[-1]]
        questions.append(row["prompt"])
        for t, (text, mark) in enumerate(zip(texts, marks)):
            last = t == len(texts) - 1
            before = tuple(ReasoningStep(s, False) for s in texts[:t])
            items.append(LabelledStep(number, before, ReasoningStep(text, last), float(marks[-1]), last))
            labels.append(float(mark))
    return questions, items, labels


def load_label_model(name: str, model_args: ModelConfig, tokenizer, device):
    """The ``label_model`` sampler, refused in one line unless it shares the base model's tokenizer (its steps are
    read by the base model, and its end of sequence and chat template must be the base model's)."""
    label_tokenizer = load_tokenizer(name)
    if (
        label_tokenizer.get_vocab() != tokenizer.get_vocab()
        or label_tokenizer.chat_template != tokenizer.chat_template
    ):
        raise UserError(
            f"key 'label_model': '{name}' has another tokenizer or chat template than the base model "
            f"'{model_args.model_name_or_path}'; the sampler's steps are scored on the base model's features"
        )
    return load_model(name, dtype=model_args.dtype, device=device).eval()


def heldout_ranking(
    engine: Engine,
    model,
    tokenizer,
    heads: CriticHeads,
    prompts: list[str],
    questions: list[dict],
    score,
    run: Config,
    seed: int,
) -> dict:
    """The fitted QVM's within-question ranking of right over wrong answers that ``engine`` (the base model)
    samples to held-out questions, scored as the ``qvm`` best-of-N scorer scores them (§4.5)."""
    sampling = SamplingParams(max_new_tokens=run.max_new_tokens, temperature=run.sampling_temperature, seed=seed)
    outputs = engine.generate(prompts, n=run.heldout_answers, sampling=sampling)
    correct = [[bool(score(c.text, q["answer"]).correct) for c in group] for q, group in zip(questions, outputs)]
    qvm = (heads, {"layer": run.feature_layer, "delimiter": run.delimiter})
    scores = qvm_scores(qvm, model, tokenizer, prompts, outputs)
    return within_question_ranking(scores, correct) | {
        "heldout_questions": len(questions),
        "heldout_answer_accuracy": float(np.mean([ok for group in correct for ok in group])),
    }


def run(
    model_args: ModelConfig, training_args: TrainingArguments, config: Config, launch: LaunchConfig, argv=()
) -> dict:
    """Sample, label, featurise and fit the QVM; returns the summary written to ``output_dir/summary.json``."""
    output_dir = Path(training_args.output_dir)
    ledger = StageLedger(
        output_dir,
        {"model": model_args.model_name_or_path, "seed": training_args.seed, **config.settings_record()},
        resume=launch.resume,
    )
    device = "cpu" if training_args.use_cpu else training_args.device
    model, tokenizer = load_from_config(model_args, device=device)
    model.eval()
    task = load_task(config.task)
    score = task_scorer(task)
    if config.stepwise_dataset is None:
        questions = load_task_rows(task, config.split, config.data_dir)[: config.limit]
        contents = [task.prompt.replace("{question}", q["question"]) for q in questions]
    else:
        contents, imported_items, imported_labels = read_stepwise(config.stepwise_dataset, config.delimiter)
    sampler_name = config.label_model or model_args.model_name_or_path
    sampler = (
        model if config.label_model is None else load_label_model(config.label_model, model_args, tokenizer, device)
    )
    engine = make_engine(config, sampler, tokenizer, sampler_name, batch_size=config.generation_batch_size)

    def render(content: str) -> str:
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
        )

    prompts = [render(content) for content in contents]
    sampling = SamplingParams(
        max_new_tokens=config.max_new_tokens, temperature=config.sampling_temperature, seed=training_args.seed
    )

    def label() -> dict:
        if config.stepwise_dataset is None:
            items = sample_steps(engine, tokenizer, prompts, questions, score, config, sampling)
            labels = rollout_labels(
                engine, tokenizer, prompts, questions, score, items, config, sampling, training_args.seed
            )
        else:
            items, labels = imported_items, imported_labels
        (output_dir / LABELS_FILE).write_text(
            json.dumps([dataclasses.asdict(item) | {"label": y} for item, y in zip(items, labels)]) + "\n"
        )
        exported = stepwise_rows(contents, items, labels, config.delimiter)
        (output_dir / STEPWISE_FILE).write_text("".join(json.dumps(row) + "\n" for row in exported))
        return {
            "steps": len(items),
            "rollout_label_mean": float(np.mean(labels)),
            "positive_label_rate": float(np.mean([y > 0.5 for y in labels])),
            "trajectory_accuracy": float(np.mean([item.outcome for item in items if item.last])),
            "label_source": config.stepwise_dataset or sampler_name,
        }

    labelled = ledger.run("labels", label)
    records = json.loads((output_dir / LABELS_FILE).read_text())
    items = [
        LabelledStep(
            r["question"],
            tuple(ReasoningStep(**s) for s in r["before"]),
            ReasoningStep(**r["step"]),
            r["outcome"],
            r["last"],
        )
        for r in records
    ]
    labels = [r["label"] for r in records]
    features = step_features(model, tokenizer, prompts, items, config.feature_layer, output_dir / "features")
    heads = fit_heads(features, labels, config, training_args, output_dir / "fit")
    summary: dict = {
        "model": model_args.model_name_or_path,
        "questions": len(prompts),
        "label": config.label,
        **labelled,
    }
    if config.label == "fqi":
        heads, labels = fqi_refit(
            model, tokenizer, engine, prompts, items, features, labels, heads, config, training_args, output_dir
        )
        summary["fqi_label_mean"] = float(np.mean(labels))
    save_qvm(
        heads,
        output_dir,
        {
            "base_model": model_args.model_name_or_path,
            "base_model_sha256": weights_checksum(model),
            "layer": config.feature_layer,
            "delimiter": config.delimiter,
            "hidden_size": config.qvm_hidden_size,
            "num_layers": config.qvm_layers,
            "state_dim": int(features[0][0].shape[0]),
            "task": task.name,
            "label_source": labelled["label_source"],
            "positive_label_rate": labelled["positive_label_rate"],
        },
    )
    ledger.record("fit", {"fqi_label_mean": summary.get("fqi_label_mean")})
    if config.heldout_questions:
        heldout = load_task_rows(task, config.split, config.data_dir)[
            config.limit : config.limit + config.heldout_questions
        ]
        if config.label_model is not None:  # best-of-N ranks the base model's answers, not the sampler's
            engine.close()  # an in-process vLLM engine frees its memory for the next one
            engine = make_engine(
                config, model, tokenizer, model_args.model_name_or_path, batch_size=config.generation_batch_size
            )
        summary["heldout_ranking"] = heldout_ranking(
            engine,
            model,
            tokenizer,
            heads,
            [render(task.prompt.replace("{question}", q["question"])) for q in heldout],
            heldout,
            score,
            config,
            training_args.seed + 7,
        )
    return write_summary(output_dir, summary)


def describe(summary: dict, output_dir: str) -> str:
    """The closing line of a run."""
    ranking = summary.get("heldout_ranking", {}).get("pairwise_accuracy")
    held_out = "" if ranking is None else f", ranks right over wrong held-out answers {ranking:.1%} of the time"
    return (
        f"QVM on {summary['steps']} labelled steps (mean label {summary['rollout_label_mean']:.3f}, "
        f"{summary['positive_label_rate']:.1%} positive{held_out}) saved to {output_dir}"
    )
