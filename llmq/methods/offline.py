"""``llmq train`` with ``method: shiq | dpo | sft``: one offline round on scored samples.

(build offline data from the initial model) → benchmark before → train (ShiQ, DPO or SFT) → save →
benchmark after, with the paired change.  With ``launch.distributed`` the data building and both
benchmarks run in this process and the training in ``launch.num_processes`` processes started
with ``llmq train ARGV`` (:func:`llmq.launch.launch_training`); such a process only trains.
"""

from __future__ import annotations

import ctypes
import dataclasses
import json
import resource
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from transformers import TrainerCallback, TrainingArguments
from trl import DPOTrainer, SFTTrainer, get_peft_config

from llmq.config import ModelConfig, mirror
from llmq.data.offline import load_training_dataset, mixed_reward_groups, preference_pairs
from llmq.errors import UserError
from llmq.evaluation import EvalConfig, GenerateConfig, build_offline_dataset, evaluate, format_report
from llmq.launch import LaunchConfig, is_launched_process, launch_training
from llmq.methods import method_field
from llmq.methods.stages import StageLedger, paired_change, write_summary
from llmq.models import load_from_config, load_model
from llmq.rollout.engines import EngineConfig
from llmq.trainers import DPOConfig, SFTConfig, ShiQConfig, ShiQTrainer

# The training processes' metrics, read back by the process that launched them.
TRAIN_METRICS = "train_metrics.json"
TRAINING_ARGUMENTS: dict[str, type[TrainingArguments]] = {"shiq": ShiQConfig, "dpo": DPOConfig, "sft": SFTConfig}


@dataclasses.dataclass
class Config(EngineConfig):
    """The run around the trainer: where the data come from (sampled by ``engine`` when built) and how
    the model is benchmarked (greedy; by vLLM when ``engine`` is vllm, else by transformers)."""

    method: str = method_field("shiq")
    dataset_path: str = dataclasses.field(
        default="outputs/offline_data",
        metadata={
            "help": "Training data: a folder saved by `llmq generate`, a .jsonl/.json file, or a Hub id. Built "
            "first from build_task when missing."
        },
    )
    data_dir: str | None = dataclasses.field(
        default=None,
        metadata={"help": "Folder with local GSM8K / MATH-500 copies; default $LLMQ_DATA_DIR, else the Hub."},
    )
    build_task: str | None = dataclasses.field(
        default=None,
        metadata={"help": "When dataset_path is missing: sample it from the initial model on this task's questions."},
    )
    build_split: str = mirror(GenerateConfig, "split")
    build_limit: int | None = dataclasses.field(default=None, metadata={"help": "First N questions of build_task."})
    build_num_completions: int = mirror(GenerateConfig, "num_completions")
    build_temperature: float = mirror(GenerateConfig, "temperature")
    build_max_new_tokens: int | None = mirror(GenerateConfig, "max_new_tokens")
    build_format_reward: float = mirror(GenerateConfig, "format_reward")
    build_min_score: float = dataclasses.field(
        default=1.0,
        metadata={
            "help": "method sft: a question's best sample (by the verifier) is kept only when it scores at least "
            "this (1: correct answers only)."
        },
    )
    mixed_groups_only: bool = dataclasses.field(
        default=False,
        metadata={
            "help": "method shiq: train only on the questions whose samples differ in reward (some right, some "
            "wrong); a question with one reward for all its samples holds no contrast."
        },
    )
    benchmark_task: str | None = dataclasses.field(
        default=None,
        metadata={
            "help": "Evaluate greedily on this task before and after training (none: skip); by vLLM with engine "
            "vllm (the trained model saved in output_dir), else by transformers."
        },
    )
    benchmark_split: str = mirror(EvalConfig, "split")
    benchmark_limit: int | None = dataclasses.field(
        default=None, metadata={"help": "First N benchmark questions (a fixed subset)."}
    )
    benchmark_max_new_tokens: int | None = mirror(EvalConfig, "max_new_tokens")
    generation_batch_size: int = dataclasses.field(
        default=8, metadata={"help": "Prompts per generate call when building data and benchmarking."}
    )

    def __post_init__(self) -> None:
        if self.method not in TRAINING_ARGUMENTS:
            raise UserError(f"key 'method': {self.method} is not an offline method ({', '.join(TRAINING_ARGUMENTS)})")
        self.check_engine()
        if self.engine != "hf" and self.build_task is None:
            raise UserError(
                f"key 'engine' ({self.engine}) samples the data that build_task builds; set build_task or engine hf"
            )
        local = "/" not in self.dataset_path or self.dataset_path.startswith((".", "/"))
        if self.build_task is None and local and not Path(self.dataset_path).exists():
            raise UserError(
                f"key 'dataset_path': '{self.dataset_path}' does not exist; create it with `llmq generate` or set "
                "build_task to build it first"
            )
        if self.mixed_groups_only and self.method != "shiq":
            raise UserError(
                f"key 'mixed_groups_only' is for method shiq (method {self.method}: dpo pairs only such questions "
                "already, sft keeps only right answers)"
            )
        if self.build_task is not None:
            self.build_config()  # validates the build keys now, before any model is loaded
        if self.benchmark_task is not None:
            self.benchmark_config(Path("."))

    def build_config(self, seed: int = 0) -> GenerateConfig:
        """How the training data are sampled; ``seed`` is the run's, so another seed samples other answers."""
        return GenerateConfig(
            seed=seed,
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
            **self.engine_keys(),
            # SFT data are best-of-N extractions (rejection sampling); ShiQ and DPO keep every sample.
            **(
                dict(decoding="best_of_n", num_candidates=self.build_num_completions, min_score=self.build_min_score)
                if self.method == "sft"
                else {}
            ),
        )

    def training_rows(self, dataset):
        """The rows the trainer sees: all of ``dataset``, or its mixed-reward questions (``mixed_groups_only``)."""
        return mixed_reward_groups(dataset) if self.mixed_groups_only else dataset

    def benchmark_config(self, output_dir: Path) -> EvalConfig:
        """Greedy evaluation, by vLLM when ``engine`` is vllm (the trained model is loaded from ``output_dir``)
        and otherwise by transformers: a server serves the initial weights, not the trained ones."""
        return EvalConfig(
            task=self.benchmark_task,
            split=self.benchmark_split,
            data_dir=self.data_dir,
            limit=self.benchmark_limit,
            max_new_tokens=self.benchmark_max_new_tokens,
            batch_size=self.generation_batch_size,
            output_dir=str(output_dir),
            **(self.engine_keys() if self.engine == "vllm" else {}),
        )


def config_types(method: str) -> tuple[type, type]:
    """The trainer's arguments and the run's config of ``method``."""
    return TRAINING_ARGUMENTS.get(method, ShiQConfig), Config


class ReturnFreedHostMemory(TrainerCallback):
    """Without CUDA, where weights and optimizer states are in host memory: hands the pages glibc keeps for freed
    blocks back to the OS (``malloc_trim``) when training begins and after every optimizer step.

    glibc returns a freed block only at the top of its heap; the tensors freed below it stay resident. Building the
    models partitioned and DeepSpeed's flattening of the shards free gigabytes that way before the first step (a
    ZeRO-3 process of a 0.5B model, docs/results.md). Fixing the mmap threshold instead (MALLOC_MMAP_THRESHOLD_)
    returns every freed tensor at once, but made one-process training 1.2–1.5× slower."""

    def __init__(self) -> None:
        self.trim = getattr(ctypes.CDLL(None), "malloc_trim", None)  # glibc's (musl has none)

    def on_train_begin(self, args, state, control, **kwargs) -> None:
        if self.trim is not None:
            self.trim(0)

    on_step_end = on_train_begin


def fit(model, tokenizer, dataset, model_args: ModelConfig, training_args: TrainingArguments, method: str) -> tuple:
    """Train ``model`` on ``dataset`` with the method's trainer and save it to ``output_dir``; returns the trainer and
    its metrics."""
    extra = {}
    if method == "dpo":
        if "reward" in dataset.column_names:
            dataset = preference_pairs(dataset)
            extra["preference_pairs"] = len(dataset)
        dataset = dataset.select_columns(["prompt", "chosen", "rejected"])
    elif method == "sft":
        dataset = dataset.select_columns(["prompt", "completion"])
    trainer_type = {"shiq": ShiQTrainer, "dpo": DPOTrainer, "sft": SFTTrainer}[method]
    model.train()
    trainer = trainer_type(
        model=model,
        args=training_args,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=get_peft_config(model_args),
    )
    if not torch.cuda.is_available() and sys.platform.startswith("linux"):
        trainer.add_callback(ReturnFreedHostMemory())
    result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    # The largest training process's peak resident memory, taken before the save (TRL's DPO and SFT trainers gather the
    # whole model in process 0 to save it under ZeRO-3).
    peak = torch.tensor(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, device=trainer.accelerator.device)
    extra["peak_host_memory_gib"] = trainer.accelerator.gather(peak).max().item()
    try:
        trainer.save_model(training_args.output_dir)
    except (OSError, SafetensorError) as error:
        raise UserError(
            f"training finished but the model could not be saved to {training_args.output_dir} "
            f"({type(error).__name__}: {' '.join(str(error).split())}); "
            "free disk space and resume from the last checkpoint (llmq train --resume) to save it"
        ) from None
    return trainer, dict(result.metrics) | extra


def run(
    model_args: ModelConfig,
    training_args: TrainingArguments,
    config: Config,
    launch: LaunchConfig,
    argv: Sequence[str] = (),
) -> dict:
    """Run an offline recipe end to end; returns the summary written to ``output_dir/summary.json``.

    With ``launch.resume`` a benchmark recorded in ``output_dir/stages.json`` by an earlier run of
    the same settings is not run again, and the training continues from its last checkpoint.
    """
    output_dir = Path(training_args.output_dir)
    if is_launched_process():
        # The training arguments exist already: under ZeRO-3 their DeepSpeed config makes `from_pretrained` build the
        # model partitioned (deepspeed.zero.Init), so no process ever holds all of its weights.
        model, tokenizer = load_from_config(
            model_args, device="cpu" if training_args.use_cpu else training_args.device
        )
        # A ZeRO-3 parameter keeps its shard in `ds_tensor` and its full size in `ds_numel`.
        held = sum(getattr(p, "ds_tensor", p).numel() for p in model.parameters()) / sum(
            getattr(p, "ds_numel", p.numel()) for p in model.parameters()
        )
        trainer, metrics = fit(
            model,
            tokenizer,
            config.training_rows(load_training_dataset(config.dataset_path)),
            model_args,
            training_args,
            config.method,
        )
        metrics["weights_held_at_load"] = held
        if trainer.is_world_process_zero():
            (output_dir / TRAIN_METRICS).write_text(json.dumps(metrics, indent=2, default=str) + "\n")
        return {"train": metrics}

    if config.benchmark_task and getattr(training_args, "q_model", False):
        raise UserError(
            "keys 'q_model' and 'benchmark_task': a Q model is no policy to benchmark alone; leave benchmark_task "
            "unset and evaluate the model it guides: llmq eval --model_name_or_path REFERENCE --decoding guided "
            "--guide_model OUTPUT_DIR"
        )
    if config.engine == "vllm" and config.benchmark_task and model_args.use_peft:
        raise UserError(
            "keys 'engine' vllm and 'use_peft': the benchmark after training loads the saved model, which holds "
            "only PEFT adapters; use engine hf for the benchmark or train without PEFT"
        )
    settings = {"model": model_args.model_name_or_path, "seed": training_args.seed, **config.settings_record()}
    ledger = StageLedger(output_dir, settings, resume=launch.resume)
    building = config.build_task is not None and not Path(config.dataset_path).exists()
    device = "cpu" if training_args.use_cpu or not torch.cuda.is_available() else "cuda"
    # With several training processes this one needs the model only to build data and to benchmark.
    model = tokenizer = None
    if not launch.distributed or building or config.benchmark_task:
        model, tokenizer = load_from_config(model_args, device=device)
    summary: dict = {"model": model_args.model_name_or_path, "method": config.method}

    def benchmark(stage: str) -> dict:
        model.eval()
        eval_config = config.benchmark_config(output_dir / f"benchmark_{stage}")
        # vLLM loads the weights by name: the initial model's, or the trained model saved in output_dir.
        if config.engine == "vllm":
            name = model_args.model_name_or_path if stage == "before" else str(output_dir)
        else:
            name = f"{model_args.model_name_or_path} ({stage} {config.method})"
        report = evaluate(model, tokenizer, eval_config, model_name=name, restart_on_mismatch=True)
        print(f"benchmark {stage} {config.method}:\n{format_report(report)}", flush=True)
        return report

    if config.benchmark_task:
        summary["before"] = ledger.run("before", lambda: benchmark("before"))
    if building:
        model.eval()
        dataset = build_offline_dataset(
            model, tokenizer, config.build_config(training_args.seed), model_name=model_args.model_name_or_path
        )
        print(
            f"offline data: {len(dataset)} completions, mean reward {np.mean(dataset['reward']):.3f} → "
            f"{config.dataset_path}",
            flush=True,
        )
    else:
        dataset = load_training_dataset(config.dataset_path)
    dataset = config.training_rows(dataset)
    summary["train_rows"] = len(dataset)

    if launch.distributed:
        model = None  # its memory is the training processes'
        launch_training(argv, launch, training_args.resume_from_checkpoint)
        metrics = json.loads((output_dir / TRAIN_METRICS).read_text())
        if config.benchmark_task:
            model = load_model(str(output_dir), dtype=model_args.dtype, device=device)
    else:
        trainer, metrics = fit(model, tokenizer, dataset, model_args, training_args, config.method)
        model = trainer.model
    if "preference_pairs" in metrics:
        summary["preference_pairs"] = metrics.pop("preference_pairs")
    summary["train"] = ledger.record("train", metrics)

    if config.benchmark_task:
        summary["after"] = ledger.record("after", benchmark("after"))
        summary["change"] = {
            metric: paired_change(
                before, summary["after"]["per_question"][metric], metric, config.method, training_args.seed
            )
            for metric, before in summary["before"]["per_question"].items()
        }
    return write_summary(output_dir, summary)


def describe(summary: dict, output_dir: str) -> str:
    """The closing line of a run."""
    return (
        f"model saved to {output_dir}; summary: {output_dir}/summary.json (train loss "
        f"{summary['train'].get('train_loss', float('nan')):.4f})"
    )
