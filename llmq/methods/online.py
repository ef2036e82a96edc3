"""``llmq train`` with ``method: online``: rounds of sampling from the current policy, scoring, replay and updates.

    llmq train recipes/online/shiq_products_smollm2.yaml

Each round samples ``completions_per_prompt`` answers to ``prompts_per_round`` train questions of
``task`` with ``engine`` (transformers on the training model, or vLLM with the new weights loaded
after every round), scores them with the task's verifier plus any ``reward_funcs``, and trains with
``objective`` (shiq, or the iterated baselines dpo and sft) on fresh and replayed rows
(:mod:`llmq.trainers.online`).  Held-out greedy accuracy on the first ``eval_limit`` questions of
``eval_split`` is measured before training and every ``eval_every`` rounds.  ``--resume`` continues
after the last finished round.  With ``accelerate_config`` / ``num_processes`` every process samples
and trains on its own prompts (DDP averages the gradients) and the first one evaluates.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import math
import resource
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from trl import get_peft_config

from llmq.config import ModelConfig, mirror
from llmq.data.tasks import TaskSpec, load_task, load_task_rows, task_scorer
from llmq.data.trajectories import sampled_trajectory
from llmq.errors import UserError
from llmq.evaluation import GenerateConfig
from llmq.launch import LaunchConfig, is_launched_process, launch_training
from llmq.methods import method_field
from llmq.methods.stages import paired_change, write_summary
from llmq.models import load_from_config
from llmq.rollout.base import SamplingParams
from llmq.rollout.engines import EngineConfig, make_engine
from llmq.rollout.vllm import encode
from llmq.stats import proportion_summary
from llmq.trainers.online import OnlineConfig, OnlineTrainer, RoundSamples

RewardFunction = Callable[..., list]


@dataclasses.dataclass
class TaskRewardsConfig(EngineConfig):
    """The prompts, rewards and held-out questions of a run in rounds: ``method: online`` and ``method: grpo``."""

    task: str = dataclasses.field(
        default="products_3x1digit",
        metadata={"help": "Task whose train questions are the prompts and whose verifier scores the answers."},
    )
    split: str = dataclasses.field(default="train", metadata={"help": "Split of the prompts."})
    data_dir: str | None = dataclasses.field(
        default=None,
        metadata={"help": "Folder with local GSM8K / MATH-500 copies; default $LLMQ_DATA_DIR, else the Hub."},
    )
    format_reward: float = mirror(GenerateConfig, "format_reward")
    reward_funcs: list[str] = dataclasses.field(
        default_factory=list,
        metadata={
            "help": "Extra reward functions added to the verifier's reward, as module:function with TRL's signature "
            "f(prompts, completions, completion_ids, **columns) -> list of floats (columns: answer, question_index)."
        },
    )
    eval_split: str = dataclasses.field(default="test", metadata={"help": "Split of the held-out questions."})
    eval_limit: int = dataclasses.field(
        default=100, metadata={"help": "Held-out questions: the first N of eval_split (a fixed subset)."}
    )

    def __post_init__(self) -> None:
        self.check_engine()
        load_task(self.task)
        if self.eval_limit < 1:
            raise UserError(f"key 'eval_limit' must be at least 1, got {self.eval_limit}")
        for name in self.reward_funcs:
            load_reward_function(name)


@dataclasses.dataclass
class Config(TaskRewardsConfig):
    """What is sampled each round, and how held-out accuracy is measured."""

    method: str = method_field("online")
    temperature: float = mirror(GenerateConfig, "temperature")
    top_p: float = mirror(GenerateConfig, "top_p")
    max_new_tokens: int | None = mirror(GenerateConfig, "max_new_tokens")
    generation_batch_size: int = dataclasses.field(
        default=64, metadata={"help": "Prompts per generate call (engine hf)."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.temperature <= 0:
            raise UserError(f"key 'temperature' must be > 0 to sample different answers, got {self.temperature}")
        if self.generation_batch_size < 1:
            raise UserError(f"key 'generation_batch_size' must be at least 1, got {self.generation_batch_size}")


def config_types(method: str) -> tuple[type, type]:
    return OnlineConfig, Config


def load_reward_function(name: str) -> RewardFunction:
    """``module:function`` → the function (imported, never evaluated as code)."""
    module_name, _, function_name = name.partition(":")
    if not module_name or not function_name:
        raise UserError(f"key 'reward_funcs': '{name}' is not module:function")
    try:
        function = getattr(importlib.import_module(module_name), function_name)
    except (ImportError, AttributeError) as error:
        raise UserError(f"key 'reward_funcs': cannot load '{name}' ({type(error).__name__}: {error})") from None
    if not callable(function):
        raise UserError(f"key 'reward_funcs': '{name}' is not callable")
    return function


def task_prompts(task: TaskSpec, questions: list[dict]) -> list[list[dict]]:
    """Each question as the user turn of a chat, in the task's prompt template."""
    return [[{"role": "user", "content": task.prompt.replace("{question}", q["question"])}] for q in questions]


def verifier_reward(task: TaskSpec, format_reward: float) -> RewardFunction:
    """The task's verifier as a reward function with TRL's signature: 1 for a correct answer, plus
    ``format_reward`` when it is stated in the task's format."""
    score = task_scorer(task)

    def reward(prompts, completions, answer, **kwargs) -> list[float]:
        verdicts = [score(_text(completion), gold) for completion, gold in zip(completions, answer)]
        return [float(v.correct) + format_reward * v.formatted for v in verdicts]

    reward.__name__ = f"{task.name}_verifier"
    return reward


def checked_reward(function: RewardFunction) -> RewardFunction:
    """``function`` that fails with a :class:`UserError` naming it and the row when it raises, returns another
    number of values than completions, or a value that is not a finite number."""
    name = getattr(function, "__name__", repr(function))

    def reward(prompts, completions, **kwargs) -> list[float]:
        try:
            values = function(prompts=prompts, completions=completions, **kwargs)
        except UserError:
            raise
        except Exception as error:  # a user's function may raise anything: find the first row it fails on
            row = next(
                (row for row in range(len(completions)) if _fails_on_row(function, row, prompts, completions, kwargs)),
                None,
            )
            where = f" on row {row}" if row is not None else ""
            raise UserError(f"reward function {name} failed{where}: {type(error).__name__}: {error}") from None
        if not isinstance(values, Sequence) or len(values) != len(completions):
            count = len(values) if isinstance(values, Sequence) else type(values).__name__
            raise UserError(f"reward function {name} returned {count} values for {len(completions)} completions")
        for row, value in enumerate(values):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise UserError(f"reward function {name} returned {value!r} for row {row}: rewards must be finite")
        return [float(value) for value in values]

    reward.__name__ = name
    return reward


def _fails_on_row(function: RewardFunction, row: int, prompts, completions, columns: dict) -> bool:
    """Whether ``function`` raises on row ``row`` alone."""
    only = {key: value[row : row + 1] if isinstance(value, list) else value for key, value in columns.items()}
    try:
        function(prompts=prompts[row : row + 1], completions=completions[row : row + 1], **only)
    except Exception:  # a user's function may raise anything
        return True
    return False


def total_rewards(functions: Sequence[RewardFunction], prompts, completions, completion_ids, columns: dict) -> list:
    """The sum of every (checked) function's rewards for each completion."""
    totals = [0.0] * len(completions)
    for function in functions:
        values = function(prompts=prompts, completions=completions, completion_ids=completion_ids, **columns)
        totals = [total + value for total, value in zip(totals, values)]
    return totals


def reward_functions(task: TaskSpec, config) -> list[RewardFunction]:
    """The verifier's reward and the recipe's ``reward_funcs``, each checked."""
    functions = [verifier_reward(task, config.format_reward), *map(load_reward_function, config.reward_funcs)]
    return [checked_reward(function) for function in functions]


def held_out_evaluation(
    engine_for: Callable, task: TaskSpec, questions: list[dict], budget: int
) -> Callable[[torch.nn.Module], dict]:
    """Greedy accuracy of a model on ``questions`` (the same ones every time), with its Wilson interval and the
    per-question outcomes (for paired intervals between rounds and runs)."""
    prompts, score = task_prompts(task, questions), task_scorer(task)

    def evaluate(model) -> dict:
        outputs = engine_for(model).generate(prompts, n=1, sampling=SamplingParams(max_new_tokens=budget))
        correct = [score(group[0].text, q["answer"]).correct for group, q in zip(outputs, questions)]
        summary = proportion_summary(correct)
        return {"accuracy": summary["mean"], "accuracy_ci95": summary["ci95"], "correct": [int(c) for c in correct]}

    return evaluate


def _text(completion) -> str:
    """A completion as TRL hands it to reward functions: a string, or a list of chat messages."""
    return completion if isinstance(completion, str) else completion[-1]["content"]


def _sampling_seed(seed: int, round_index: int, process: int) -> int:
    digest = hashlib.blake2b(f"llmq-online:{seed}:{round_index}:{process}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little")


def run(
    model_args: ModelConfig,
    training_args: OnlineConfig,
    config: Config,
    launch: LaunchConfig,
    argv: Sequence[str] = (),
) -> dict:
    """Run an online recipe; returns the summary written to ``output_dir/summary.json``."""
    output_dir = Path(training_args.output_dir)
    if launch.distributed:
        launch_training(list(argv), launch)  # every process runs the rounds; the first writes the summary
        return json.loads((output_dir / "summary.json").read_text())
    if config.engine != "hf" and (launch.num_processes > 1 or is_launched_process()):
        raise UserError(f"engine {config.engine} samples in one process; with several processes use engine hf")

    model, tokenizer = load_from_config(model_args, device="cpu" if training_args.use_cpu else None)
    task = load_task(config.task)
    budget = config.max_new_tokens or task.max_new_tokens
    cut_before_the_end = budget < task.max_new_tokens  # as in llmq generate: a cut at the task's budget is terminal
    questions = load_task_rows(task, config.split, config.data_dir)
    held_out = load_task_rows(task, config.eval_split, config.data_dir)[: config.eval_limit]
    functions = reward_functions(task, config)
    order = torch.randperm(len(questions), generator=torch.Generator().manual_seed(training_args.seed)).tolist()

    engine = None  # vLLM: built once, loads the training weights after every round
    if config.engine != "hf":
        engine = make_engine(config, model, tokenizer, model_args.model_name_or_path, progress=False)

    def engine_for(policy):
        if engine is not None:
            return engine
        return make_engine(
            config,
            policy,
            tokenizer,
            model_args.model_name_or_path,
            progress=False,
            batch_size=config.generation_batch_size,
        )

    trainer: OnlineTrainer  # assigned below; the rollout reads the process index from it

    def rollout(round_index: int, policy) -> RoundSamples:
        accelerator = trainer.accelerator
        count = training_args.prompts_per_round
        first = (round_index * accelerator.num_processes + accelerator.process_index) * count
        chosen = [questions[order[(first + i) % len(questions)]] for i in range(count)]
        prompts = task_prompts(task, chosen)
        sampling = SamplingParams(
            max_new_tokens=budget,
            temperature=config.temperature,
            top_p=config.top_p,
            seed=_sampling_seed(training_args.seed, round_index, accelerator.process_index),
        )
        try:
            outputs = engine_for(policy).generate(prompts, n=training_args.completions_per_prompt, sampling=sampling)
        except Exception as error:  # the engine died (vLLM out of memory, a server gone)
            reason = str(error) if isinstance(error, UserError) else f"{type(error).__name__}: {error}"
            raise UserError(
                f"engine {config.engine} failed in round {round_index + 1} ({reason}); `llmq train ... --resume` "
                f"redoes this round from the checkpoint of the last finished one in {output_dir}"
            ) from None
        flat = [(q, p, c) for q, p, group in zip(chosen, prompts, outputs) for c in group]
        completions = [[{"role": "assistant", "content": c.text}] for _, _, c in flat]
        try:
            rewards = total_rewards(
                functions,
                [p for _, p, _ in flat],
                completions,
                [c.token_ids for _, _, c in flat],
                {"answer": [q["answer"] for q, _, _ in flat], "question_index": [q["index"] for q, _, _ in flat]},
            )
        except UserError as error:
            raise UserError(
                f"round {round_index + 1}: {error}; the replay buffer and the rounds before this one are kept in "
                f"{output_dir} (fix the function, then `llmq train ... --resume`)"
            ) from None
        # The prompts' tokens as the engines feed them, once per prompt (not once per answer).
        prompt_tokens = {id(prompt): encode(tokenizer, prompt) for prompt in prompts}
        rows = []
        for index, ((question, prompt, completion), reward) in enumerate(zip(flat, rewards)):
            if not completion.token_ids:
                continue  # nothing to learn from an empty answer
            truncated = completion.finish_reason == "length" and cut_before_the_end
            tokens = sampled_trajectory(
                prompt_tokens[id(prompt)], completion.token_ids, reward, truncated, training_args.max_length, index
            )
            rows.append(
                tokens
                | {"group": question["index"], "reward": reward, "sampled_logp": float(sum(completion.logprobs))}
            )
        return RoundSamples(rows=rows, sampled_tokens=sum(len(c.token_ids) for _, _, c in flat))

    trainer = OnlineTrainer(
        model,
        training_args,
        rollout,
        pad_token_id=tokenizer.pad_token_id,
        peft_config=get_peft_config(model_args),
        sync=engine.load_weights if engine is not None else None,
        evaluate=held_out_evaluation(engine_for, task, held_out, task.max_new_tokens),  # scored as llmq eval scores
    )
    try:
        log = trainer.train(resume=launch.resume)
    finally:
        if engine is not None:
            engine.close()
    if not trainer.accelerator.is_main_process:
        return {}
    trainer.unwrapped_model.save_pretrained(output_dir, safe_serialization=True)
    tokenizer.save_pretrained(output_dir)
    summary = rounds_summary(
        log, model_args.model_name_or_path, f"online {training_args.objective}", training_args.seed
    )
    return write_summary(output_dir, summary | {"task": config.task, "objective": training_args.objective})


def rounds_summary(log: list[dict], model_name: str, method: str, seed: int) -> dict:
    """A run in rounds: its log, sampled tokens and wall time, and held-out accuracy before and after with the
    paired change."""
    summary = {
        "model": model_name,
        "method": method,
        "rounds": log,
        "sampled_tokens": log[-1]["sampled_tokens"],
        "wall_s": log[-1].get("wall_s", 0.0),
        "peak_memory_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    }
    update_s = sum(entry.get("update_s", 0.0) for entry in log)
    if update_s:
        summary["update_tokens_per_s"] = round(log[-1]["training_tokens"] / update_s, 1)
    evaluated = [entry for entry in log if "correct" in entry]
    if len(evaluated) >= 2:
        before, after = evaluated[0], evaluated[-1]
        summary["before"] = {key: before[key] for key in ("accuracy", "accuracy_ci95")}
        summary["after"] = {key: after[key] for key in ("accuracy", "accuracy_ci95")}
        summary["change"] = paired_change(before["correct"], after["correct"], "accuracy", method, seed)
    return summary


def describe(summary: dict, output_dir: str) -> str:
    change = summary.get("change")
    gain = ""
    if change:
        low, high = change["ci95_paired"]
        gain = (
            f"; held-out accuracy {summary['before']['accuracy']:.3f} → {summary['after']['accuracy']:.3f} "
            f"({change['mean']:+.3f}, 95% CI {low:+.3f} to {high:+.3f})"
        )
    return f"model saved to {output_dir}{gain}; summary: {output_dir}/summary.json"
