"""``llmq train`` with ``method: qvm``: a Q-value model for Q* search from ground-truth answers only (ALGORITHMS.md §4.4).

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
   read through the state's KV cache, fitted by regression (:class:`DigiQCriticTrainer` with every
   transition terminal: its Q target is then exactly the label).

The heads are saved in ``output_dir`` (``model.safetensors`` + ``qvm.json``) for ``llmq eval --decoding qstar``.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from llmq.errors import UserError


@dataclasses.dataclass
class QVMRunConfig:
    """Where the QVM's training data come from and how the heads are fitted."""

    method: str = dataclasses.field(default="qvm", metadata={"help": "qvm.", "choices": ["qvm"]})
    task: str = dataclasses.field(default="gsm8k", metadata={"help": "Task whose training questions and gold answers give the labels."})
    split: str = dataclasses.field(default="train", metadata={"help": "Split of the questions."})
    data_dir: str | None = dataclasses.field(default=None, metadata={"help": "Local dataset folder; default $LLMQ_DATA_DIR, else the Hub."})
    limit: int = dataclasses.field(default=64, metadata={"help": "First N questions."})
    trajectories: int = dataclasses.field(default=2, metadata={"help": "Solutions sampled per question."})
    rollouts: int = dataclasses.field(default=4, metadata={"help": "Completions sampled after each step for its rollout label."})
    label: str = dataclasses.field(default="rollout", metadata={"help": "rollout (best of the completions) or fqi (fitted Q iteration from them).", "choices": ["rollout", "fqi"]})
    fqi_iterations: int = dataclasses.field(default=2, metadata={"help": "Refits with bootstrapped labels (label fqi)."})
    fqi_candidates: int = dataclasses.field(default=4, metadata={"help": "Proposed next steps per state in the FQI max (label fqi)."})
    delimiter: str = dataclasses.field(default="\n", metadata={"help": "Text that ends a reasoning step."})
    max_new_tokens: int = dataclasses.field(default=256, metadata={"help": "Tokens per sampled solution or completion."})
    sampling_temperature: float = dataclasses.field(default=0.8, metadata={"help": "Temperature of solutions, completions and proposals."})
    feature_layer: int | None = dataclasses.field(default=None, metadata={"help": "Hidden-state index of the features; default the middle layer."})
    qvm_steps: int = dataclasses.field(default=1000, metadata={"help": "Optimizer steps per fit."})
    qvm_learning_rate: float = dataclasses.field(default=1e-4, metadata={"help": "Adam learning rate of the heads."})
    qvm_batch_size: int = dataclasses.field(default=64, metadata={"help": "Labelled steps per optimizer step."})
    qvm_hidden_size: int = dataclasses.field(default=256, metadata={"help": "Width of the heads."})
    qvm_layers: int = dataclasses.field(default=2, metadata={"help": "Hidden layers per head."})
    generation_batch_size: int = dataclasses.field(default=8, metadata={"help": "Prompts per generate call."})

    def __post_init__(self) -> None:
        for name in ("limit", "trajectories", "rollouts", "fqi_iterations", "fqi_candidates", "max_new_tokens", "qvm_steps", "qvm_batch_size"):
            if getattr(self, name) < 1:
                raise UserError(f"key '{name}' must be at least 1, got {getattr(self, name)}")
        if not self.delimiter:
            raise UserError("key 'delimiter' must not be empty")


def split_steps(text: str, delimiter: str) -> list[str]:
    """A solution's steps, each keeping the delimiter that ends it; blank lines stay with the step
    before them, so the steps concatenate back to ``text`` exactly."""
    steps: list[str] = []
    for part in text.split(delimiter):
        if steps and not part.strip():
            steps[-1] += part + delimiter
        else:
            steps.append(part + delimiter)
    if steps:
        steps[-1] = steps[-1][: -len(delimiter)]  # the text does not end with the delimiter it split on
    return [step for step in steps if step] if text else []


def fit_heads(features: list[tuple[torch.Tensor, torch.Tensor]], labels: list[float], run: QVMRunConfig, training_args, output_dir: Path):
    """Regress Q heads on (state, step) features to ``labels``; returns the fitted :class:`CriticHeads`."""
    import datasets

    from llmq.trainers.digiq import DigiQCriticTrainer, critic_config

    rows = [
        {"state_features": s.tolist(), "action_features": a.tolist(), "next_state_features": s.tolist(), "reward": float(y), "done": True}
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
    trainer = DigiQCriticTrainer(args=args, train_dataset=datasets.Dataset.from_list(rows))
    trainer.train()
    return trainer.model.online.cpu().eval()


def run_qvm(model_args, training_args, run: QVMRunConfig) -> dict:
    """Sample, label, featurise and fit the QVM; returns the summary written to ``output_dir/summary.json``."""
    from safetensors.torch import save_file

    from llmq.data.tasks import load_task, load_task_rows, task_scorer
    from llmq.decoding.qstar import LLMStepProposer, ReasoningStep, fqi_labels, rollout_max_labels
    from llmq.models import load_from_config
    from llmq.models.features import score_continuations
    from llmq.rollout import HFEngine, SamplingParams

    output_dir = Path(training_args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    model, tokenizer = load_from_config(model_args, device="cpu" if training_args.use_cpu else training_args.device)
    model.eval()
    task = load_task(run.task)
    questions = load_task_rows(task, run.split, run.data_dir)[: run.limit]
    score = task_scorer(task)
    engine = HFEngine(model, tokenizer, batch_size=run.generation_batch_size)
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": task.prompt.replace("{question}", q["question"])}], tokenize=False, add_generation_prompt=True) for q in questions]
    sampling = SamplingParams(max_new_tokens=run.max_new_tokens, temperature=run.sampling_temperature, seed=training_args.seed)
    solutions = engine.generate(prompts, n=run.trajectories, sampling=sampling)

    # (question, steps before, step, outcome of the trajectory) for every step of every solution.
    eos = {tokenizer.eos_token_id}
    items = []
    for index, (question, group) in enumerate(zip(questions, solutions)):
        for completion in group:
            steps = split_steps(completion.text, run.delimiter)
            ended = bool(completion.token_ids) and completion.token_ids[-1] in eos
            outcome = float(score(completion.text, question["answer"]).correct)
            for t, step in enumerate(steps):
                final = t == len(steps) - 1
                items.append((index, tuple(ReasoningStep(s, False) for s in steps[:t]), ReasoningStep(step, final and ended), outcome, final))

    # Rollout labels: the best outcome among the trajectory's own continuation and `rollouts` more.
    # A continuation gets the tokens the solution's budget left after the step, as the trajectory's own
    # did; steps with similar budgets share a generate call, which runs to its largest budget.
    open_items = [i for i, item in enumerate(items) if not item[4]]
    written = {i: "".join(s.text for s in items[i][1]) + items[i][2].text for i in open_items}
    budget = {i: max(1, run.max_new_tokens - len(tokenizer(written[i], add_special_tokens=False)["input_ids"])) for i in open_items}
    by_budget = sorted(open_items, key=lambda i: -budget[i])
    rollout_engine = HFEngine(model, tokenizer, batch_size=run.generation_batch_size, progress=False)
    outcomes: dict[int, list[float]] = {}
    for number, start in enumerate(tqdm(range(0, len(by_budget), run.generation_batch_size), desc="rollouts", unit="batch")):
        chunk = by_budget[start : start + run.generation_batch_size]
        chunk_sampling = dataclasses.replace(sampling, seed=training_args.seed + 1 + number, max_new_tokens=budget[chunk[0]])
        for i, group in zip(chunk, rollout_engine.generate([prompts[items[i][0]] + written[i] for i in chunk], n=run.rollouts, sampling=chunk_sampling)):
            outcomes[i] = [float(score(written[i] + c.text, questions[items[i][0]]["answer"]).correct) for c in group]
    # Reward comes at the end only: a step's own reward is 0 and its continuations include the trajectory's own.
    labels = rollout_max_labels([0.0] * len(items), [[item[3], *outcomes.get(i, [])] for i, item in enumerate(items)])

    by_state: dict[tuple[int, tuple], list[int]] = {}
    for i, (index, before, _, _, _) in enumerate(items):
        by_state.setdefault((index, before), []).append(i)
    keys = list(by_state)
    state_features, step_features, _ = score_continuations(
        model, tokenizer, [prompts[index] + "".join(s.text for s in before) for index, before in keys], [[items[i][2].text for i in by_state[key]] for key in keys],
        layer=run.feature_layer, cache_dir=output_dir / "features",
    )  # fmt: skip
    features: list = [None] * len(items)
    for key, s_feature, a_features in zip(keys, state_features, step_features):
        for i, a_feature in zip(by_state[key], a_features):
            features[i] = (s_feature, a_feature)

    heads = fit_heads(features, labels, run, training_args, output_dir / "fit")
    summary: dict = {"model": model_args.model_name_or_path, "questions": len(questions), "steps": len(items), "label": run.label,
                     "rollout_label_mean": float(np.mean(labels)), "trajectory_accuracy": float(np.mean([item[3] for item in items if item[4]]))}  # fmt: skip
    if run.label == "fqi":
        # y(s, a) = max_c Q_prev(s', c) over proposed next steps c at s' = s ⊕ a; the outcome after a final step.
        from llmq.decoding.qstar import FeatureQVM

        for iteration in range(run.fqi_iterations):
            new_labels = list(labels)
            for index in sorted({item[0] for item in items}):
                qvm = FeatureQVM(model, tokenizer, heads, prompts[index], layer=run.feature_layer)
                proposer = LLMStepProposer(engine, prompts[index], eos, delimiter=run.delimiter, max_step_tokens=run.max_new_tokens,
                                           temperature=run.sampling_temperature, seed=training_args.seed + 100 * (iteration + 1))  # fmt: skip
                mine = [i for i in open_items if items[i][0] == index]
                next_states = [items[i][1] + (items[i][2],) for i in mine]
                next_q = [qvm([(state, c) for c in candidates]) for state, candidates in zip(next_states, proposer(next_states, run.fqi_candidates) if mine else [])]
                # Labels of a 0/1 outcome stay in [0, 1] whatever the current heads extrapolate.
                for i, label in zip(mine, fqi_labels([0.0] * len(mine), [False] * len(mine), next_q)):
                    new_labels[i] = float(np.clip(label, 0.0, 1.0))
            labels = new_labels
            heads = fit_heads(features, labels, run, training_args, output_dir / f"fit_fqi{iteration + 1}")
        summary["fqi_label_mean"] = float(np.mean(labels))

    save_file({name: value.contiguous() for name, value in heads.state_dict().items()}, str(output_dir / "model.safetensors"))
    metadata = {"base_model": model_args.model_name_or_path, "layer": run.feature_layer, "delimiter": run.delimiter, "hidden_size": run.qvm_hidden_size,
                "num_layers": run.qvm_layers, "state_dim": int(state_features.shape[1]), "task": task.name}  # fmt: skip
    (output_dir / "qvm.json").write_text(json.dumps(metadata, indent=2) + "\n")
    (output_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def load_qvm(path: str | Path):
    """The heads and metadata ``llmq train --method qvm`` saved in ``path``."""
    from safetensors.torch import load_file

    from llmq.models.value_heads import CriticHeads

    directory = Path(path)
    if not (directory / "qvm.json").is_file():
        raise UserError(f"key 'qvm_path': '{path}' holds no qvm.json (train one with `llmq train --method qvm`)")
    metadata = json.loads((directory / "qvm.json").read_text())
    heads = CriticHeads(metadata["state_dim"], metadata["state_dim"], metadata["hidden_size"], metadata["num_layers"])
    heads.load_state_dict(load_file(str(directory / "model.safetensors")))
    return heads.eval(), metadata
