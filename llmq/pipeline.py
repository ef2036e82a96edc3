"""``llmq train``: (build offline data) → benchmark before → train (ShiQ, DPO or SFT) → save → benchmark after."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError

from llmq.data.offline import GenerateConfig, build_offline_dataset, load_training_dataset, preference_pairs
from llmq.errors import UserError
from llmq.evaluation.run import EvalConfig, bootstrap_interval, evaluate, format_report
from llmq.launch import LaunchConfig, is_launched_process, launch_training

# The training processes' metrics, read back by the process that launched them.
TRAIN_METRICS = "train_metrics.json"


@dataclasses.dataclass
class TrainRunConfig:
    """The run around the trainer: where the data come from and how the model is benchmarked."""

    method: str = dataclasses.field(
        default="shiq",
        metadata={
            "help": "shiq (ShiQTrainer on rewarded completions), dpo (TRL's DPOTrainer on best-vs-worst pairs of the same data), or sft "
            "(TRL's SFTTrainer on best-of-N extracted completions: built data keep each question's best sample when the verifier accepts it); "
            "digiq (TextWorld agent: see llmq train --method digiq --help); qvm (Q* value model: llmq train --method qvm --help).",
            "choices": ["shiq", "dpo", "sft", "digiq", "qvm"],
        },
    )
    dataset_path: str = dataclasses.field(
        default="outputs/offline_data",
        metadata={"help": "Training data: a folder saved by `llmq generate`, a .jsonl/.json file, or a Hub id. Built first from build_task when missing."},
    )
    data_dir: str | None = dataclasses.field(default=None, metadata={"help": "Folder with local GSM8K / MATH-500 copies; default $LLMQ_DATA_DIR, else the Hub."})
    build_task: str | None = dataclasses.field(default=None, metadata={"help": "When dataset_path is missing: sample it from the initial model on this task's questions."})
    build_split: str = dataclasses.field(default="train", metadata={"help": "Split of build_task's questions."})
    build_limit: int | None = dataclasses.field(default=None, metadata={"help": "First N questions of build_task."})
    build_num_completions: int = dataclasses.field(default=4, metadata={"help": "Completions sampled per question."})
    build_temperature: float = dataclasses.field(default=1.0, metadata={"help": "Sampling temperature of the data."})
    build_max_new_tokens: int | None = dataclasses.field(default=None, metadata={"help": "Tokens per sampled completion; default the task's."})
    build_format_reward: float = dataclasses.field(default=0.0, metadata={"help": "Reward added when a sampled answer is stated in the task's format (see llmq generate --help)."})
    build_min_score: float = dataclasses.field(
        default=1.0, metadata={"help": "method sft: a question's best sample (by the verifier) is kept only when it scores at least this (1: correct answers only)."}
    )
    benchmark_task: str | None = dataclasses.field(default=None, metadata={"help": "Evaluate greedily on this task before and after training (none: skip)."})
    benchmark_split: str = dataclasses.field(default="test", metadata={"help": "Split of the benchmark."})
    benchmark_limit: int | None = dataclasses.field(default=None, metadata={"help": "First N benchmark questions (a fixed subset)."})
    benchmark_max_new_tokens: int | None = dataclasses.field(default=None, metadata={"help": "Tokens per benchmark answer; default the task's."})
    generation_batch_size: int = dataclasses.field(default=8, metadata={"help": "Prompts per generate call when building data and benchmarking."})

    def build_config(self) -> GenerateConfig:
        return GenerateConfig(
            task=self.build_task,
            split=self.build_split,
            data_dir=self.data_dir,
            limit=self.build_limit,
            num_completions=1 if self.method == "sft" else self.build_num_completions,
            temperature=self.build_temperature,
            max_new_tokens=self.build_max_new_tokens,
            format_reward=self.build_format_reward,
            batch_size=self.generation_batch_size,
            dataset_path=self.dataset_path,
            # SFT data are best-of-N extractions (rejection sampling); ShiQ and DPO keep every sample.
            **(dict(decoding="best_of_n", num_candidates=self.build_num_completions, min_score=self.build_min_score) if self.method == "sft" else {}),
        )

    def benchmark_config(self, output_dir: Path) -> EvalConfig:
        return EvalConfig(
            task=self.benchmark_task,
            split=self.benchmark_split,
            data_dir=self.data_dir,
            limit=self.benchmark_limit,
            max_new_tokens=self.benchmark_max_new_tokens,
            batch_size=self.generation_batch_size,
            output_dir=str(output_dir),
        )

    def __post_init__(self) -> None:
        local = "/" not in self.dataset_path or self.dataset_path.startswith((".", "/"))
        if self.build_task is None and local and not Path(self.dataset_path).exists():
            raise UserError(f"key 'dataset_path': '{self.dataset_path}' does not exist; create it with `llmq generate` or set build_task to build it first")
        if self.build_task is not None:
            self.build_config()  # validates the build keys now, before any model is loaded
        if self.benchmark_task is not None:
            self.benchmark_config(Path("."))


def _fit(model, tokenizer, dataset, model_args, training_args, run: TrainRunConfig) -> tuple:
    """Train ``model`` on ``dataset`` with the method's trainer and save it to ``output_dir``; returns the trainer and its metrics."""
    from trl import get_peft_config

    from llmq.trainers import ShiQTrainer

    model.train()
    extra = {}
    if run.method == "dpo":
        from trl import DPOTrainer

        if "reward" in dataset.column_names:
            dataset = preference_pairs(dataset)
            extra["preference_pairs"] = len(dataset)
        dataset = dataset.select_columns(["prompt", "chosen", "rejected"])
        trainer = DPOTrainer(model=model, args=training_args, train_dataset=dataset, processing_class=tokenizer, peft_config=get_peft_config(model_args))
    elif run.method == "sft":
        from trl import SFTTrainer

        dataset = dataset.select_columns(["prompt", "completion"])
        trainer = SFTTrainer(model=model, args=training_args, train_dataset=dataset, processing_class=tokenizer, peft_config=get_peft_config(model_args))
    else:
        trainer = ShiQTrainer(model=model, args=training_args, train_dataset=dataset, processing_class=tokenizer, peft_config=get_peft_config(model_args))
    result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    try:
        trainer.save_model(training_args.output_dir)
    except (OSError, SafetensorError) as error:
        raise UserError(f"training finished but the model could not be saved to {training_args.output_dir} ({type(error).__name__}: {' '.join(str(error).split())}); "
                        "free disk space and resume from the last checkpoint (llmq train --resume) to save it") from None
    return trainer, dict(result.metrics) | extra


def run_training(model_args, training_args, run: TrainRunConfig, launch: LaunchConfig | None = None, argv: Sequence[str] = ()) -> dict:
    """Run a training recipe end to end and return the summary written to ``output_dir/summary.json``.

    With ``launch.distributed``, data building and both benchmarks run here, in one process, and
    the training itself in ``launch.num_processes`` processes started with ``llmq train ARGV``; a
    process started that way (:func:`llmq.launch.is_launched_process`) only trains.
    """
    from llmq.models import load_from_config, load_model

    output_dir = Path(training_args.output_dir)
    if is_launched_process():
        model, tokenizer = load_from_config(model_args, device="cpu" if training_args.use_cpu else training_args.device)
        trainer, metrics = _fit(model, tokenizer, load_training_dataset(run.dataset_path), model_args, training_args, run)
        if trainer.is_world_process_zero():
            (output_dir / TRAIN_METRICS).write_text(json.dumps(metrics, indent=2, default=str) + "\n")
        return {"train": metrics}

    launch = launch or LaunchConfig()
    building = run.build_task is not None and not Path(run.dataset_path).exists()
    device = "cpu" if training_args.use_cpu or not torch.cuda.is_available() else "cuda"
    # With several training processes this one needs the model only to build data and to benchmark.
    model = tokenizer = None
    if not launch.distributed or building or run.benchmark_task:
        model, tokenizer = load_from_config(model_args, device=device)
    summary: dict = {"model": model_args.model_name_or_path, "method": run.method}

    def benchmark(stage: str) -> dict:
        model.eval()
        config = run.benchmark_config(output_dir / f"benchmark_{stage}")
        report = evaluate(model, tokenizer, config, model_name=f"{model_args.model_name_or_path} ({stage} {run.method})", restart_on_mismatch=True)
        print(format_report(report), flush=True)
        return report

    if run.benchmark_task:
        summary["before"] = benchmark("before")
    if building:
        model.eval()
        dataset = build_offline_dataset(model, tokenizer, run.build_config(), model_name=model_args.model_name_or_path)
        rewards = np.asarray(dataset["reward"])
        print(f"offline data: {len(dataset)} completions, mean reward {rewards.mean():.3f} → {run.dataset_path}", flush=True)
    else:
        dataset = load_training_dataset(run.dataset_path)
    summary["train_rows"] = len(dataset)

    if launch.distributed:
        model = None  # its memory is the training processes'
        resume = ["--resume_from_checkpoint", str(training_args.resume_from_checkpoint)] if training_args.resume_from_checkpoint else []
        launch_training([*argv, *resume], launch)
        metrics = json.loads((output_dir / TRAIN_METRICS).read_text())
        if run.benchmark_task:
            model = load_model(str(output_dir), dtype=model_args.dtype, device=device)
    else:
        trainer, metrics = _fit(model, tokenizer, dataset, model_args, training_args, run)
        model = trainer.model
    if "preference_pairs" in metrics:
        summary["preference_pairs"] = metrics.pop("preference_pairs")
    summary["train"] = metrics

    if run.benchmark_task:
        summary["after"] = benchmark("after")
        summary["change"] = {}
        for metric, before in summary["before"]["per_question"].items():
            difference = np.asarray(summary["after"]["per_question"][metric], dtype=float) - np.asarray(before, dtype=float)
            low, high = bootstrap_interval(difference, seed=training_args.seed)
            summary["change"][metric] = {"mean": float(difference.mean()), "ci95_paired": [low, high]}
            print(f"change after {run.method}, {metric}: {100 * difference.mean():+.1f} points (paired 95% CI {100 * low:+.1f} to {100 * high:+.1f})", flush=True)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return summary
