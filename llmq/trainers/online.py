"""Online training in rounds: sample from the current policy → score → replay buffer → updates → weight sync.

    trainer = OnlineTrainer(model, OnlineConfig(output_dir="out", objective="shiq"), rollout, pad_token_id=0)
    trainer.train()

Each round (docs/algorithms.md §2.13):

1. ``rollout(round, model)`` samples ``completions_per_prompt`` answers to ``prompts_per_round`` prompts from
   the *current* policy and scores them; it returns tokenized trajectories
   (:func:`llmq.data.trajectories.tokenize_trajectory` rows) with their ``group`` (the prompt) and
   ``reward``;
2. the reference (the initial model, or the model with its adapters disabled) scores the new rows
   once: ``ref_logp`` / ``ref_lse`` per token, kept with the rows;
3. the objective picks its rows — ShiQ every trajectory (or the prompts with mixed rewards), DPO the
   best-vs-worst pair of each prompt, SFT the best answer of each prompt (rejection sampling) — and
   they enter the bounded :class:`~llmq.data.replay.ReplayBuffer`;
4. ``updates_per_round`` optimizer steps on batches of which ``replay_fraction`` are rows of earlier
   rounds (older policies) and the rest this round's;
5. ``sync()`` hands the new weights to the engine that samples (vLLM); ``evaluate(round)`` measures
   held-out accuracy every ``eval_every`` rounds;
6. the round's checkpoint (weights, optimizer, scheduler, RNG states, buffer, metrics) is written,
   ``trainer_state.json`` last, so ``--resume`` continues after the last finished round.

ShiQ is off-policy: its fixed point does not depend on which policy sampled the data, so replayed
rows of old policies are as good as fresh ones (the oracle test trains on nothing else).  DPO and
SFT are the iterated baselines a user would otherwise run (iterated DPO, iterated rejection-sampling
fine-tuning); their losses are :func:`llmq.losses.dpo_loss` and the log-likelihood of the best answer.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import set_seed
from peft import get_peft_model
from tqdm.auto import tqdm
from transformers import get_scheduler

from llmq.checkpoints import TRAINER_STATE, complete_checkpoints
from llmq.data.replay import ReplayBuffer, mixed_batches
from llmq.data.trajectories import TrajectoryCollator, length_ordered_batches
from llmq.errors import NonFiniteLossError, UserError
from llmq.losses import dpo_loss, shiq_loss
from llmq.mdp import action_logit_rows, token_logprobs
from llmq.trainers.shiq import ShiQConfig

OBJECTIVES = ("shiq", "dpo", "sft")
BUFFER_FILE = "replay_buffer.json"
CHECKPOINT_PREFIX = "checkpoint-"


@dataclass
class OnlineConfig(ShiQConfig):
    """Arguments of :class:`OnlineTrainer`: :class:`~llmq.trainers.ShiQConfig` (``beta``, ``gamma``,
    ``loss_type``, ``max_length``, the optimizer keys of ``TrainingArguments``) plus the rounds below.

    The optimizer runs ``rounds × updates_per_round`` steps of ``per_device_train_batch_size ×
    gradient_accumulation_steps`` rows (per process); ``lr_scheduler_type`` and the warm-up keys
    schedule over all of them.  ``max_steps``, ``num_train_epochs`` and ``save_steps`` do not apply:
    a run is ``rounds`` long and saves a checkpoint after every round (keeping the newest ``save_total_limit``, 2).
    Reference statistics are always computed once per sampled row (``precompute_ref_log_probs``).
    """

    objective: str = field(
        default="shiq",
        metadata={
            "help": "shiq (Bellman-consistent logits on every sample, off-policy), dpo (iterated DPO on each "
            "round's best-vs-worst pairs) or sft (iterated rejection sampling: the best answer of each prompt).",
            "choices": list(OBJECTIVES),
        },
    )
    rounds: int = field(default=8, metadata={"help": "Rounds of sampling and updates."})
    prompts_per_round: int = field(default=16, metadata={"help": "Prompts sampled per round (per process)."})
    completions_per_prompt: int = field(default=4, metadata={"help": "Completions sampled per prompt."})
    updates_per_round: int = field(default=8, metadata={"help": "Optimizer steps per round."})
    replay_fraction: float = field(
        default=0.5,
        metadata={
            "help": "Share of each batch drawn from the replay buffer's rows of earlier rounds (older policies); the "
            "rest are this round's. 0: on-policy rows only."
        },
    )
    buffer_capacity: int = field(
        default=4096, metadata={"help": "Rows the replay buffer holds (per process); the oldest leave first."}
    )
    mixed_groups_only: bool = field(
        default=False,
        metadata={"help": "objective shiq: keep only the prompts whose samples differ in reward (DAPO's filter)."},
    )
    min_score: float = field(
        default=1.0, metadata={"help": "objective sft: a prompt's best answer is kept only when its reward is this."}
    )
    eval_every: int = field(
        default=1, metadata={"help": "Evaluate held-out accuracy before training and after every N rounds."}
    )
    learning_rate: float = field(default=5e-5, metadata={"help": "AdamW learning rate."})
    save_total_limit: int | None = field(
        default=2,
        metadata={"help": "Round checkpoints kept (the newest; each holds the optimizer and the buffer). None: all."},
    )
    precompute_ref_log_probs: bool = field(
        default=True, metadata={"help": "Always on for online runs: each sampled row is scored once by the reference."}
    )

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}")
        for name in ("rounds", "prompts_per_round", "completions_per_prompt", "updates_per_round", "eval_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not 0 <= self.replay_fraction <= 1:
            raise ValueError(f"replay_fraction must be in [0, 1], got {self.replay_fraction}")
        if self.ref_model_name_or_path is not None:
            raise ValueError("ref_model_name_or_path: an online run's reference is always its initial model")
        if self.objective == "dpo" and self.completions_per_prompt < 2:
            raise ValueError("objective dpo pairs answers of a prompt: completions_per_prompt must be at least 2")
        self.precompute_ref_log_probs = True
        super().__post_init__()

    @property
    def total_updates(self) -> int:
        return self.rounds * self.updates_per_round


@dataclass
class RoundSamples:
    """What a rollout returns: tokenized trajectories (each with ``group`` and ``reward``; optionally
    ``sampled_logp``, the sampling policy's log-probability of the answer) and the sampled tokens."""

    rows: list[dict]
    sampled_tokens: int


def objective_rows(rows: list[dict], args: OnlineConfig) -> list[dict]:
    """The rows of one round that the objective trains on (see the module docstring, step 3)."""
    groups: dict = {}
    for row in rows:
        groups.setdefault(row["group"], []).append(row)
    if args.objective == "shiq":
        if not args.mixed_groups_only:
            return rows
        return [row for group in groups.values() if len({r["reward"] for r in group}) > 1 for row in group]
    if args.objective == "dpo":
        pairs = []
        for group in groups.values():
            best, worst = max(group, key=lambda r: r["reward"]), min(group, key=lambda r: r["reward"])
            if best["reward"] > worst["reward"]:
                pairs.append({"chosen": best, "rejected": worst})
        return pairs
    best_rows = [max(group, key=lambda r: r["reward"]) for group in groups.values()]
    return [row for row in best_rows if row["reward"] >= args.min_score]


class OnlineTrainer:
    """Runs the rounds of :class:`OnlineConfig` with accelerate (DDP or DeepSpeed when launched by ``accelerate
    launch``; each process samples, buffers and trains on its own prompts, gradients are averaged).

    Args:
        model: the policy (a transformers causal LM, or a :class:`llmq.testing.TabularLM`).
        args: :class:`OnlineConfig`.
        rollout: ``rollout(round, model) → RoundSamples`` from the current policy ``model`` (the unwrapped
            training model; see the module docstring).
        pad_token_id: padding of the trajectory batches.
        ref_model: the frozen reference; by default a frozen copy of ``model`` (with ``peft_config``:
            the model with its adapters disabled).
        peft_config: train PEFT adapters (e.g. LoRA) instead of all weights.
        sync: called after each round's updates with the unwrapped model, to load its weights where the
            rollout samples (an in-process vLLM engine); not needed when the rollout samples from the
            model itself.
        evaluate: ``evaluate(model) → dict`` with at least ``accuracy``; run on the main process before
            training and every ``eval_every`` rounds.
    """

    def __init__(
        self,
        model,
        args: OnlineConfig,
        rollout: Callable[[int, torch.nn.Module], RoundSamples],
        *,
        pad_token_id: int,
        ref_model=None,
        peft_config=None,
        sync: Callable | None = None,
        evaluate: Callable | None = None,
    ) -> None:
        self.args = args
        self.rollout, self.sync, self.evaluate = rollout, sync, evaluate
        report_to = [name for name in args.report_to if name != "none"]
        deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
        if deepspeed and not torch.cuda.is_available():
            PartialState(backend="gloo")  # DeepSpeed on CPU processes (accelerate would pick NCCL)
        self.accelerator = Accelerator(
            gradient_accumulation_steps=args.gradient_accumulation_steps,
            cpu=args.use_cpu and not deepspeed,
            mixed_precision="bf16" if args.bf16 else "fp16" if args.fp16 else "no",
            log_with=report_to or None,
            project_dir=args.output_dir,
        )
        set_seed(args.seed)
        self.uses_peft = peft_config is not None
        if self.uses_peft:
            if args.gradient_checkpointing:
                model.enable_input_require_grads()
            model = get_peft_model(model, peft_config)
        elif ref_model is None:
            ref_model = copy.deepcopy(model).requires_grad_(False).eval()
        if args.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.ref_model = ref_model.to(self.accelerator.device) if ref_model is not None else None
        optimizer = torch.optim.AdamW(
            [p for p in model.parameters() if p.requires_grad],
            lr=args.learning_rate,
            betas=(args.adam_beta1, args.adam_beta2),
            eps=args.adam_epsilon,
            weight_decay=args.weight_decay,
        )
        if deepspeed:  # no dataloader goes through accelerate, so DeepSpeed is told the batch and the clipping
            if self.accelerator.state.deepspeed_plugin.zero_stage == 3:
                raise UserError(
                    "online runs copy the initial model as the reference and hand whole weights to the engine: use "
                    "accelerate_config ddp or zero2, not ZeRO-3"
                )
            self.accelerator.state.deepspeed_plugin.deepspeed_config.update(
                train_micro_batch_size_per_gpu=args.per_device_train_batch_size, gradient_clipping=args.max_grad_norm
            )
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        # Stepped by hand once per optimizer step (accelerate would step it once per process).
        self.scheduler = get_scheduler(
            args.lr_scheduler_type,
            self.optimizer,
            num_warmup_steps=args.get_warmup_steps(args.total_updates),
            num_training_steps=args.total_updates,
        )
        self.accelerator.register_for_checkpointing(self.scheduler)
        self.collator = TrajectoryCollator(pad_token_id)
        self.buffer = ReplayBuffer(args.buffer_capacity)
        self.log: list[dict] = []

    @property
    def unwrapped_model(self):
        return self.accelerator.unwrap_model(self.model)

    # ----- the loop -----------------------------------------------------------------------------------------

    def train(self, resume: bool = False) -> list[dict]:
        """Run the rounds (after the last finished one, with ``resume``); returns the per-round log."""
        args, main = self.args, self.accelerator.is_main_process
        start = self._resume() if resume else 0
        if main:
            self.accelerator.init_trackers("llmq-online", config=_tracker_config(args))
        if start == 0 and self.evaluate is not None and main:
            self.log.append({"round": 0, "sampled_tokens": 0, **self._evaluate()})
            print(f"before training: held-out accuracy {self.log[0]['accuracy']:.3f}", flush=True)
        for round_index in tqdm(range(start, args.rounds), desc="rounds", disable=not main or args.disable_tqdm):
            entry = self._round(round_index)
            self.log.append(entry)
            if main:
                self.accelerator.log({k: v for k, v in entry.items() if _is_number(v)}, step=round_index + 1)
                print(_round_line(entry), flush=True)
            self._save_round(round_index + 1)
        for tracker in self.accelerator.trackers:  # not end_training(): an in-process vLLM engine shares the
            tracker.finish()  # process group, and it is its owner's to close
        return self.log

    def _round(self, round_index: int) -> dict:
        args = self.args
        started = time.perf_counter()
        self.model.eval()
        samples = self.rollout(round_index, self.unwrapped_model)
        fresh = self._with_reference_statistics(samples.rows)
        rewards = [row["reward"] for row in fresh]
        kl = [row["sampled_logp"] - _action_sum(row, "ref_logp") for row in fresh if "sampled_logp" in row]
        selected = objective_rows(fresh, args)
        replayed = self.buffer.older_than(round_index)
        self.buffer.add(selected, round_index)
        sampling_s = time.perf_counter() - started

        self.model.train()
        updates_started = time.perf_counter()
        rng = np.random.default_rng([args.seed, round_index])
        rows_per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps
        batches = mixed_batches(selected, replayed, args.replay_fraction, args.updates_per_round, rows_per_step, rng)
        losses, training_tokens = [], 0
        for batch in batches:
            for start in range(0, len(batch), args.per_device_train_batch_size):
                micro_batch = batch[start : start + args.per_device_train_batch_size]
                if not micro_batch:  # nothing to train on this round (no pair, no answer good enough)
                    continue
                with self.accelerator.accumulate(self.model):
                    loss, tokens = self._loss(micro_batch)
                    if not torch.isfinite(loss):
                        raise NonFiniteLossError(
                            f"the {args.objective} loss became {loss.item()} in round {round_index + 1}; the last "
                            f"finished round's checkpoint is in {args.output_dir} (--resume); lower learning_rate"
                        )
                    self.accelerator.backward(loss)
                    if self.accelerator.sync_gradients and args.max_grad_norm:
                        self.accelerator.clip_grad_norm_(self.model.parameters(), args.max_grad_norm)
                    self.optimizer.step()
                    if self.accelerator.sync_gradients:
                        self.scheduler.step()
                    self.optimizer.zero_grad()
                losses.append(loss.item())
                training_tokens += tokens
        update_s = time.perf_counter() - updates_started
        self.model.eval()
        if self.sync is not None:
            self.sync(self.unwrapped_model)
        previous = self.log[-1] if self.log else {}
        age = self.buffer.age(round_index + 1)
        entry = {
            "round": round_index + 1,
            "reward_mean": _mean(rewards),
            "kl": _mean(kl) if kl else None,
            "loss": _mean(losses) if losses else None,
            "training_rows": len(selected),
            "buffer_rows": len(self.buffer),
            "buffer_age_mean": age["mean"],
            "buffer_age_max": age["max"],
            "sampled_tokens": previous.get("sampled_tokens", 0) + self._summed(samples.sampled_tokens),
            "training_tokens": previous.get("training_tokens", 0) + self._summed(training_tokens),
            "learning_rate": self.scheduler.get_last_lr()[0],
            "sampling_s": round(sampling_s, 2),
            "update_s": round(update_s, 2),
        }
        entry["round_s"] = round(time.perf_counter() - started, 2)
        entry["wall_s"] = round(previous.get("wall_s", 0.0) + entry["round_s"], 2)
        last = round_index + 1 == args.rounds
        if self.evaluate is not None and ((round_index + 1) % args.eval_every == 0 or last):
            if self.accelerator.is_main_process:
                entry.update(self._evaluate())
            self.accelerator.wait_for_everyone()
        return entry

    def _evaluate(self) -> dict:
        self.model.eval()
        return self.evaluate(self.unwrapped_model)

    def _summed(self, value: int) -> int:
        """``value`` summed over the processes."""
        return int(self.accelerator.reduce(torch.tensor(value, device=self.accelerator.device), "sum").item())

    # ----- losses ---------------------------------------------------------------------------------------------

    def _loss(self, rows: list[dict]) -> tuple[torch.Tensor, int]:
        """The objective's loss on ``rows`` and the tokens it read."""
        args = self.args
        if args.objective == "dpo":
            chosen, rejected = [r["chosen"] for r in rows], [r["rejected"] for r in rows]
            logps, ref_logps, tokens = self._sequence_logps(chosen + rejected)
            loss, _ = dpo_loss(
                logps[: len(rows)], logps[len(rows) :], ref_logps[: len(rows)], ref_logps[len(rows) :], beta=args.beta
            )
            return loss, tokens
        batch = self._collate(rows)
        logit_rows = action_logit_rows(batch["act_mask"], batch["truncated"])
        logits = self._action_logits(batch, logit_rows)
        tokens = int(batch["attention_mask"].sum())
        if args.objective == "sft":
            logp, _ = token_logprobs(logits, batch["input_ids"], logit_rows)
            mask = batch["act_mask"]
            return -(logp * mask).sum() / mask.sum().clamp(min=1), tokens
        loss, _ = shiq_loss(
            logits,
            input_ids=batch["input_ids"],
            act_mask=batch["act_mask"],
            rewards=batch["rewards"],
            beta=args.beta,
            gamma=args.gamma,
            ref_logp=batch["ref_logp"],
            ref_lse=batch["ref_lse"],
            truncated=batch["truncated"],
            loss_type=args.loss_type,
            logit_rows=logit_rows,
        )
        return loss, tokens

    def _sequence_logps(self, rows: list[dict]) -> tuple[torch.Tensor, torch.Tensor, int]:
        """``log π_θ(y|x)`` and ``log π_ref(y|x)`` of each row, summed over its action tokens."""
        batch = self._collate(rows)
        logit_rows = action_logit_rows(batch["act_mask"])
        logp, _ = token_logprobs(self._action_logits(batch, logit_rows), batch["input_ids"], logit_rows)
        mask = batch["act_mask"]
        return (logp * mask).sum(1), (batch["ref_logp"] * mask).sum(1), int(batch["attention_mask"].sum())

    def _action_logits(self, batch: dict[str, torch.Tensor], logit_rows: torch.Tensor) -> torch.Tensor:
        """The policy's logits rows ``logit_rows`` only: the LM head never scores prompt positions."""
        return self.model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], logits_to_keep=logit_rows
        ).logits

    def _collate(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        batch = self.collator(rows)
        dtype = next(self.unwrapped_model.parameters()).dtype
        if dtype == torch.float64:  # a tabular oracle model: reference statistics in its precision
            batch["ref_logp"], batch["ref_lse"] = batch["ref_logp"].double(), batch["ref_lse"].double()
        return {name: value.to(self.accelerator.device) for name, value in batch.items()}

    @torch.no_grad()
    def _with_reference_statistics(self, rows: list[dict]) -> list[dict]:
        """``rows`` with the reference's ``ref_logp`` / ``ref_lse`` per token (one more than the row's
        tokens: the state after the last one, which a truncated row bootstraps from), scored only where the losses read
        them (:func:`~llmq.mdp.action_logit_rows`; 0 elsewhere)."""
        scored = [dict(row) for row in rows]
        for indices in length_ordered_batches(
            [len(r["input_ids"]) for r in rows], self.args.per_device_eval_batch_size
        ):
            batch = self.collator([rows[i] for i in indices])
            inputs = {
                "input_ids": batch["input_ids"].to(self.accelerator.device),
                "attention_mask": batch["attention_mask"].to(self.accelerator.device),
                "logits_to_keep": action_logit_rows(batch["act_mask"], batch["truncated"]).to(self.accelerator.device),
            }
            if self.ref_model is not None:
                logits = self.ref_model(**inputs).logits
            else:
                with self.unwrapped_model.disable_adapter():
                    logits = self.unwrapped_model(**inputs).logits
            logp, lse = token_logprobs(logits, inputs["input_ids"], inputs["logits_to_keep"])
            for i, row_logp, row_lse in zip(indices, logp.float().cpu(), lse.float().cpu()):
                length = len(rows[i]["input_ids"]) + 1
                scored[i]["ref_logp"] = row_logp[:length].tolist()
                scored[i]["ref_lse"] = row_lse[:length].tolist()
        return scored

    # ----- checkpoints ------------------------------------------------------------------------------------------

    def _save_round(self, rounds_done: int) -> None:
        """``output_dir/checkpoint-N`` after round N: accelerate's state (weights as safetensors, optimizer,
        scheduler, RNG states), each process's buffer, and ``trainer_state.json`` (the log) written last."""
        folder = Path(self.args.output_dir) / f"{CHECKPOINT_PREFIX}{rounds_done}"
        self.accelerator.save_state(str(folder), safe_serialization=True)
        self.buffer.save(folder / _buffer_name(self.accelerator.process_index))
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            state = {"rounds_done": rounds_done, "log_history": self.log}
            (folder / TRAINER_STATE).write_text(json.dumps(state, indent=2) + "\n")
            limit = self.args.save_total_limit
            if limit:
                for old in complete_checkpoints(self.args.output_dir)[limit:]:
                    shutil.rmtree(old, ignore_errors=True)
        self.accelerator.wait_for_everyone()

    def _resume(self) -> int:
        """Load the newest complete round checkpoint; returns the rounds it had finished (0: none)."""
        checkpoints = complete_checkpoints(self.args.output_dir)
        if not checkpoints:
            return 0
        folder = checkpoints[0]
        state = json.loads((folder / TRAINER_STATE).read_text())
        self.accelerator.load_state(str(folder))
        self.buffer = ReplayBuffer.load(
            folder / _buffer_name(self.accelerator.process_index), self.args.buffer_capacity
        )
        self.log = state["log_history"]
        if self.sync is not None:
            self.sync(self.unwrapped_model)
        if self.accelerator.is_main_process:
            print(f"resuming after round {state['rounds_done']} from {folder}", flush=True)
        return state["rounds_done"]


def _buffer_name(process_index: int) -> str:
    return BUFFER_FILE if process_index == 0 else f"replay_buffer_{process_index}.json"


def _action_sum(row: dict, key: str) -> float:
    return float(sum(value for value, action in zip(row[key], row["act_mask"]) if action))


def _mean(values) -> float:
    return float(np.mean(values)) if len(values) else math.nan


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _tracker_config(args: OnlineConfig) -> dict:
    keys = ("objective", "rounds", "prompts_per_round", "completions_per_prompt", "updates_per_round")
    return {key: getattr(args, key) for key in (*keys, "replay_fraction", "beta", "learning_rate", "seed")}


def _round_line(entry: dict) -> str:
    parts = [f"round {entry['round']}", f"reward {entry['reward_mean']:.3f}"]
    if entry.get("accuracy") is not None:
        parts.append(f"held-out accuracy {entry['accuracy']:.3f}")
    parts += [
        f"KL {entry['kl']:.2f}" if entry.get("kl") is not None else "KL -",
        f"buffer {entry['buffer_rows']} (mean age {entry['buffer_age_mean']:.1f})",
        f"sampled tokens {entry['sampled_tokens']}",
        f"{entry['round_s']:.0f} s",
    ]
    return ", ".join(parts)
