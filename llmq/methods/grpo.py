"""``llmq train`` with ``method: grpo``: TRL's own ``GRPOTrainer``, the peer online ShiQ is measured against.

    llmq train recipes/online/grpo_products_smollm2.yaml

The prompts are ``task``'s train questions (chat prompts, with their gold ``answer`` as a column),
the rewards are the same functions as ``method: online`` uses (the task's verifier plus
``reward_funcs``), and held-out greedy accuracy is measured the same way, before training and after
every ``eval_every`` generation batches.  A generation batch (TRL's ``generation_batch_size``
completions, ``num_generations`` per prompt) is one round of ``method: online``: with the same
prompts and completions per round, both runs sample the same number of answers per round, and the
summary logs the sampled tokens of each round so the two are compared at equal sampled tokens.
``engine: vllm`` turns on TRL's colocated vLLM (``use_vllm``), ``engine: vllm_server`` its server mode.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Sequence
from pathlib import Path

import datasets
from transformers import TrainerCallback
from trl import GRPOTrainer, get_peft_config

from llmq.config import ModelConfig
from llmq.data.tasks import load_task, load_task_rows
from llmq.errors import UserError
from llmq.launch import LaunchConfig
from llmq.methods import method_field, online
from llmq.methods.online import (
    TaskRewardsConfig,
    held_out_evaluation,
    reward_functions,
    rounds_summary,
    task_prompts,
)
from llmq.methods.stages import write_summary
from llmq.models import load_from_config
from llmq.rollout.engines import EngineConfig, make_engine
from llmq.trainers.trl_configs import GRPOConfig

LOG_FILE = "rounds.json"  # the per-round log, also kept in every checkpoint for --resume


@dataclasses.dataclass
class Config(TaskRewardsConfig):
    """The prompts, rewards and held-out evaluation of a GRPO run (the keys of ``method: online``)."""

    method: str = method_field("grpo")
    eval_every: int = dataclasses.field(
        default=1,
        metadata={"help": "Evaluate held-out accuracy before training and after every N generation batches."},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.eval_every < 1:
            raise UserError(f"key 'eval_every' must be at least 1, got {self.eval_every}")


def config_types(method: str) -> tuple[type, type]:
    return GRPOConfig, Config


class RoundLog(TrainerCallback):
    """After every generation batch (TRL's ``steps_per_generation`` optimizer steps): the round's mean reward,
    the sampled tokens so far and, every ``eval_every`` rounds, held-out accuracy; kept in each checkpoint."""

    def __init__(self, evaluate, steps_per_round: int, eval_every: int, counters: dict, log: list[dict]) -> None:
        self.evaluate, self.steps_per_round, self.eval_every = evaluate, steps_per_round, eval_every
        self.counters, self.log = counters, log
        self.started = time.perf_counter()

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.steps_per_round == 0:
            self._log_round(state, model)
        if control.should_save and state.is_world_process_zero:
            # Written before the Trainer writes the checkpoint, whose trainer_state.json (written last) marks it
            # complete: a checkpoint --resume picks always has its log.
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            folder.mkdir(parents=True, exist_ok=True)
            (folder / LOG_FILE).write_text(json.dumps({"log": self.log, "counters": self.counters}) + "\n")

    def _log_round(self, state, model) -> None:
        round_number = state.global_step // self.steps_per_round
        rewards = self.counters.pop("rewards", [])
        previous = self.log[-1] if self.log else {}
        entry = {
            "round": round_number,
            "reward_mean": sum(rewards) / len(rewards) if rewards else None,
            "sampled_tokens": self.counters["sampled_tokens"],
            "wall_s": round(previous.get("wall_s", 0.0) + time.perf_counter() - self.started, 2),
        }
        self.started = time.perf_counter()
        last = state.global_step >= state.max_steps
        if state.is_world_process_zero and (round_number % self.eval_every == 0 or last):
            model.eval()
            entry.update(self.evaluate(model))
            model.train()
        self.log.append(entry)
        if state.is_world_process_zero:
            accuracy = f", held-out accuracy {entry['accuracy']:.3f}" if "accuracy" in entry else ""
            print(f"round {round_number}: sampled tokens {entry['sampled_tokens']}{accuracy}", flush=True)


def run(
    model_args: ModelConfig, training_args: GRPOConfig, config: Config, launch: LaunchConfig, argv: Sequence[str] = ()
) -> dict:
    """Run a GRPO recipe with TRL's ``GRPOTrainer``; returns the summary written to ``output_dir/summary.json``."""
    output_dir = Path(training_args.output_dir)
    model, tokenizer = load_from_config(model_args, device="cpu" if training_args.use_cpu else None)
    task = load_task(config.task)
    questions = load_task_rows(task, config.split, config.data_dir)
    held_out = load_task_rows(task, config.eval_split, config.data_dir)[: config.eval_limit]
    prompts = datasets.Dataset.from_dict(
        {
            "prompt": task_prompts(task, questions),
            "answer": [q["answer"] for q in questions],
            "question_index": [q["index"] for q in questions],
        }
    )
    counters: dict = {"sampled_tokens": 0}
    log: list[dict] = []
    if training_args.resume_from_checkpoint:
        saved = json.loads((Path(training_args.resume_from_checkpoint) / LOG_FILE).read_text())
        log[:], counters = saved["log"], saved["counters"]

    def counted(function):
        """The reward function, also counting the round's sampled tokens and rewards (for the round log)."""

        def reward(prompts, completions, completion_ids, **kwargs):
            values = function(prompts=prompts, completions=completions, completion_ids=completion_ids, **kwargs)
            counters["sampled_tokens"] += sum(len(ids) for ids in completion_ids)
            counters.setdefault("rewards", []).extend(values)
            return values

        reward.__name__ = function.__name__
        return reward

    verifier, *extra = reward_functions(task, config)
    if config.engine != "hf":
        training_args.use_vllm = True
        training_args.vllm_mode = "colocate" if config.engine == "vllm" else "server"
        training_args.vllm_server_base_url = config.vllm_server_url[0]
    evaluate = held_out_evaluation(
        lambda policy: make_engine(
            EngineConfig(),
            policy,
            tokenizer,
            model_args.model_name_or_path,
            progress=False,
            batch_size=training_args.per_device_eval_batch_size,
        ),
        task,
        held_out,
        task.max_new_tokens,  # scored as llmq eval scores
    )
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=[counted(verifier), *extra],
        args=training_args,
        train_dataset=prompts,
        processing_class=tokenizer,
        peft_config=get_peft_config(model_args),
    )
    if not log:
        model.eval()
        log.append({"round": 0, "sampled_tokens": 0, **evaluate(model)})
        print(f"before training: held-out accuracy {log[0]['accuracy']:.3f}", flush=True)
    trainer.add_callback(RoundLog(evaluate, training_args.steps_per_generation, config.eval_every, counters, log))
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(str(output_dir))
    summary = rounds_summary(log, model_args.model_name_or_path, "grpo", training_args.seed)
    return write_summary(output_dir, summary | {"task": config.task})


describe = online.describe
