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
from llmq.decoding.qstar import LLMStepProposer
from llmq.errors import UserError
from llmq.launch import LaunchConfig
from llmq.losses import fqi_labels, rollout_max_labels
from llmq.methods import method_field
from llmq.methods.stages import StageLedger, write_summary
from llmq.models import load_from_config
from llmq.models.features import score_continuations
from llmq.models.qvm import FeatureQVM, ReasoningStep, save_qvm, split_steps, weights_checksum
from llmq.models.value_heads import CriticHeads
from llmq.rollout import Engine, SamplingParams
from llmq.rollout.engines import EngineConfig, make_engine
from llmq.trainers.critic import CriticConfig, CriticTrainer, critic_config

LABELS_FILE = "labels.json"


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
    model, tokenizer = load_from_config(model_args, device="cpu" if training_args.use_cpu else training_args.device)
    model.eval()
    task = load_task(config.task)
    questions = load_task_rows(task, config.split, config.data_dir)[: config.limit]
    score = task_scorer(task)
    engine = make_engine(
        config,
        model,
        tokenizer,
        model_args.model_name_or_path,
        batch_size=config.generation_batch_size,
    )
    prompts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": task.prompt.replace("{question}", q["question"])}],
            tokenize=False,
            add_generation_prompt=True,
        )
        for q in questions
    ]
    sampling = SamplingParams(
        max_new_tokens=config.max_new_tokens, temperature=config.sampling_temperature, seed=training_args.seed
    )

    def label() -> dict:
        items = sample_steps(engine, tokenizer, prompts, questions, score, config, sampling)
        labels = rollout_labels(
            engine, tokenizer, prompts, questions, score, items, config, sampling, training_args.seed
        )
        (output_dir / LABELS_FILE).write_text(
            json.dumps([dataclasses.asdict(item) | {"label": y} for item, y in zip(items, labels)]) + "\n"
        )
        return {
            "steps": len(items),
            "rollout_label_mean": float(np.mean(labels)),
            "trajectory_accuracy": float(np.mean([item.outcome for item in items if item.last])),
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
        "questions": len(questions),
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
        },
    )
    ledger.record("fit", {"fqi_label_mean": summary.get("fqi_label_mean")})
    return write_summary(output_dir, summary)


def describe(summary: dict, output_dir: str) -> str:
    """The closing line of a run."""
    return (
        f"QVM on {summary['steps']} labelled steps (mean label {summary['rollout_label_mean']:.3f}) saved to "
        f"{output_dir}"
    )
