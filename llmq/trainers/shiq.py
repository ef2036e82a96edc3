"""ShiQ trainer: Q-learning on the LM's own logits, off-policy, no value head, no target network.

    trainer = ShiQTrainer(model="smollm2-135m-instruct", args=ShiQConfig(output_dir="out", beta=0.1),
                          train_dataset=dataset, processing_class=tokenizer)
    trainer.train()

The loss is :func:`llmq.losses.shiq_loss` (docs/algorithms.md §2); the datasets are described in
:mod:`llmq.data.trajectories`.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, field

import datasets
import torch
from peft import get_peft_model
from transformers import TrainingArguments, set_seed
from transformers.integrations import is_deepspeed_zero3_enabled
from trl.models import prepare_deepspeed

from llmq.data.trajectories import TrajectoryCollator, length_ordered_batches, tokenize_trajectory
from llmq.errors import UserError
from llmq.losses import shiq_loss
from llmq.mdp import action_logit_rows, token_logprobs
from llmq.models import load_model
from llmq.models.q_model import is_q_model, make_q_model
from llmq.trainers.metrics import LossMetricsTrainer


@dataclass
class ShiQConfig(TrainingArguments):
    """Arguments of :class:`ShiQTrainer`: every ``TrainingArguments`` field plus the ones below.

    Parameters:
        beta: KL temperature β. Only ``reward / β`` matters for the optimal policy: with 0/1
            rewards, β = 0.1 lets the policy move a token's probability by up to e^10.
        gamma: discount γ, advanced on action tokens only (1 for single-turn LLM tasks).
        loss_type: ``multistep`` — the residual (S3) from every action token to the end of the
            trajectory (default, propagates sparse rewards at once); ``one_step`` — (S2).
        max_length: longest tokenized trajectory; longer rows are an error naming the row.
        skip_invalid_rows: skip malformed rows (missing fields, empty completions, non-finite
            rewards, longer than ``max_length``) instead of stopping at the first; they are counted
            and the first few are named in a warning.
        precompute_ref_log_probs: run the reference model once over the dataset before training
            and store ``log π_ref`` and ``LSE ℓ_ref`` per token (fp32), so no reference model is
            kept in memory during training.
        ref_model_name_or_path: the reference π_ref, any model with the policy's vocabulary (a registered name,
            local path or Hub id); default: the initial policy.
        q_model: train the model as a Q model beside the reference (docs/algorithms.md §6.6): its LM head is
            replaced by a zero-initialised one and its logits are ``Q/β``, the policy being ``ℓ_ref + ℓ_model``.
            With a small model and a large ``ref_model_name_or_path`` it is a cheap guide for the large one
            (``llmq eval --decoding guided --guide_model``).
    """

    beta: float = field(
        default=0.1, metadata={"help": "KL temperature beta > 0; only reward/beta matters for the optimal policy."}
    )
    gamma: float = field(default=1.0, metadata={"help": "Discount, advanced on action tokens only."})
    loss_type: str = field(
        default="multistep",
        metadata={
            "help": "multistep (S3 residuals to the end of the trajectory) or one_step (S2).",
            "choices": ["multistep", "one_step"],
        },
    )
    max_length: int = field(
        default=1024, metadata={"help": "Longest tokenized trajectory; longer rows are an error naming the row."}
    )
    skip_invalid_rows: bool = field(
        default=False,
        metadata={
            "help": "Skip malformed rows (counted, the first named in a warning) instead of stopping at the first one."
        },
    )
    precompute_ref_log_probs: bool = field(
        default=False,
        metadata={
            "help": "Compute the reference log-probs and log-sum-exps once before training instead of keeping a "
            "live reference model."
        },
    )
    ref_model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "The reference model (same vocabulary as the policy: a registered name, local path or Hub id); "
            "default: the initial policy."
        },
    )
    q_model: bool = field(
        default=False,
        metadata={
            "help": "Train the model as a Q model beside the reference: a zero-initialised LM head whose logits are "
            "Q/beta, the policy being reference logits + model logits (a small guide for a large reference)."
        },
    )
    learning_rate: float = field(default=1e-6, metadata={"help": "AdamW learning rate."})
    logging_steps: float = field(default=10, metadata={"help": "Log every N steps."})
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Keep the trajectory columns (llmq's collator needs them)."}
    )

    def __post_init__(self) -> None:
        if self.beta <= 0:
            raise ValueError(f"beta must be > 0, got {self.beta}")
        if not 0 < self.gamma <= 1:
            raise ValueError(f"gamma must be in (0, 1], got {self.gamma}")
        if self.q_model and self.precompute_ref_log_probs:
            raise ValueError(
                "q_model adds the reference's logits to the model's at every token: it needs a live reference, not "
                "precompute_ref_log_probs"
            )
        super().__post_init__()


def _tokenize_rows(dataset, tokenizer, args: ShiQConfig):
    """Tokenized trajectories; a malformed row is an error naming it, or with ``skip_invalid_rows`` a counted skip."""
    if not args.skip_invalid_rows:
        tokenize = lambda row, index: tokenize_trajectory(row, tokenizer, args.max_length, index)  # noqa: E731
        return dataset.map(tokenize, with_indices=True, remove_columns=dataset.column_names, desc="tokenize")
    rows, problems = [], []
    for index, row in enumerate(dataset):
        try:
            rows.append(tokenize_trajectory(row, tokenizer, args.max_length, index))
        except UserError as error:
            problems.append(str(error))
    if problems:
        warnings.warn(
            f"skipped {len(problems)} of {len(dataset)} rows: "
            + "; ".join(problems[:3])
            + ("; ..." if len(problems) > 3 else ""),
            stacklevel=3,
        )
    if not rows:
        raise UserError(f"every one of the {len(dataset)} rows is malformed; the first: {problems[0]}")
    return datasets.Dataset.from_list(rows)


class ShiQTrainer(LossMetricsTrainer):
    """``transformers.Trainer`` that minimises the ShiQ loss on offline trajectories.

    Args:
        model: a causal LM, or a registered name / local path / Hub id to load.
        ref_model: the frozen reference. ``None`` means: the model with its adapters disabled
            (with ``peft_config``), a frozen copy of the initial model, or nothing at all when
            ``args.precompute_ref_log_probs`` is set.
        args: :class:`ShiQConfig`.
        train_dataset, eval_dataset: HF datasets in a format of :mod:`llmq.data.trajectories`.
        processing_class: the tokenizer (chat template used for conversational rows).
        peft_config: a PEFT config (e.g. ``LoraConfig``) to train adapters instead of all weights.
    """

    _tag_names = ["llmq", "shiq"]

    def __init__(
        self,
        model,
        ref_model=None,
        args: ShiQConfig | None = None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        peft_config=None,
        **kwargs,
    ):
        if args is None:
            raise UserError("ShiQTrainer needs args=ShiQConfig(...)")
        if processing_class is None:
            raise UserError("ShiQTrainer needs processing_class=<the tokenizer>")
        if isinstance(model, str):
            model = load_model(model, dtype="auto")
        if ref_model is None and args.ref_model_name_or_path is not None:
            ref_model = load_model(args.ref_model_name_or_path, dtype=str(model.dtype).removeprefix("torch."))
            sizes = [m.get_output_embeddings().out_features for m in (ref_model, model)]
            if sizes[0] != sizes[1]:
                raise UserError(
                    f"key 'ref_model_name_or_path': '{args.ref_model_name_or_path}' scores {sizes[0]} tokens and the "
                    f"model {sizes[1]}; a reference must share the policy's vocabulary"
                )
        self.uses_peft = peft_config is not None
        if args.q_model and self.uses_peft:
            raise UserError("q_model trains a new LM head with the whole model; it cannot be combined with use_peft")
        if self.uses_peft:
            set_seed(args.seed)  # LoRA's A matrices are random: make the adapters reproducible
            if args.gradient_checkpointing:
                model.enable_input_require_grads()
            model = get_peft_model(model, peft_config)
            if ref_model is not None:
                raise UserError(
                    "give either ref_model or peft_config: with PEFT the reference is the model with its adapters "
                    "disabled"
                )
        elif ref_model is None and not args.precompute_ref_log_probs:
            if is_deepspeed_zero3_enabled():
                # Under ZeRO-3 the loaded weights are already partitioned, and a copy would hold empty
                # shards: load the reference again (partitioned the same way), as TRL does.
                ref_model = load_model(model.name_or_path, dtype=str(model.dtype).removeprefix("torch."))
            else:
                ref_model = copy.deepcopy(model)
        if args.precompute_ref_log_probs and is_deepspeed_zero3_enabled():
            raise UserError(
                "precompute_ref_log_probs runs the unsharded model and is not available under DeepSpeed ZeRO-3; use "
                "a live reference (the default) or ZeRO-2"
            )
        if ref_model is not None:
            ref_model.requires_grad_(False).eval()
        self.ref_model = ref_model
        if args.q_model and not is_q_model(model):  # a Q model trained further keeps its head
            make_q_model(model, args.beta)

        train_dataset = _tokenize_rows(train_dataset, processing_class, args)
        if eval_dataset is not None:
            eval_dataset = _tokenize_rows(eval_dataset, processing_class, args)
        super().__init__(
            model=model,
            args=args,
            data_collator=TrajectoryCollator(processing_class.pad_token_id),
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            **kwargs,
        )
        if self.ref_model is not None:
            if self.is_deepspeed_enabled:
                self.ref_model = prepare_deepspeed(
                    self.ref_model, self.accelerator
                )  # sharded like the policy under ZeRO-3
            else:
                self.ref_model.to(self.accelerator.device)
        if args.precompute_ref_log_probs:
            self.train_dataset = self._with_reference_statistics(self.train_dataset)
            if self.eval_dataset is not None:
                self.eval_dataset = self._with_reference_statistics(self.eval_dataset)

    def _reference_logits(self, batch: dict[str, torch.Tensor], rows: torch.Tensor) -> torch.Tensor:
        """The reference's logits rows ``rows`` (``logits_to_keep``)."""
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "logits_to_keep": rows}
        with torch.no_grad():
            if self.ref_model is not None:
                return self.ref_model(**inputs).logits
            if self.uses_peft:
                with self.accelerator.unwrap_model(self.model).disable_adapter():
                    return self.model(**inputs).logits
            # Only reached by the precompute pass, before any update: the model is the reference.
            return self.model(**inputs).logits

    def _with_reference_statistics(self, dataset):
        """One pass of the reference over ``dataset``: per-token ``ref_logp`` / ``ref_lse`` columns.

        Each row keeps one value more than its tokens: the state after its last token, which a
        truncated row bootstraps from.  Only the positions the loss reads are scored (its actions and a truncated
        row's bootstrap state, :func:`~llmq.mdp.action_logit_rows`); the others hold 0.
        """
        batches = length_ordered_batches(
            [len(ids) for ids in dataset["input_ids"]], self.args.per_device_eval_batch_size
        )
        logps, lses = [None] * len(dataset), [None] * len(dataset)
        self.model.eval()
        for indices in batches:
            rows = [dataset[i] for i in indices]
            batch = {k: v.to(self.accelerator.device) for k, v in self.data_collator(rows).items()}
            scored = action_logit_rows(batch["act_mask"], batch["truncated"])
            logp, lse = token_logprobs(self._reference_logits(batch, scored), batch["input_ids"], scored)
            for i, row, row_logp, row_lse in zip(indices, rows, logp.cpu(), lse.cpu()):
                logps[i] = row_logp[: len(row["input_ids"]) + 1].tolist()
                lses[i] = row_lse[: len(row["input_ids"]) + 1].tolist()
        return dataset.add_column("ref_logp", logps).add_column("ref_lse", lses)

    def compute_loss(self, model, inputs, return_outputs: bool = False, num_items_in_batch=None):
        # Logits only where the loss reads them: the LM head never scores prompt or observation positions.
        rows = action_logit_rows(inputs["act_mask"], inputs["truncated"])
        # The reference first, as TRL's DPOTrainer does: the memory of its forward (under ZeRO-3 each layer's gathered
        # weights) then never adds to the policy's activations, which are kept for the backward pass.
        if "ref_logp" in inputs:
            reference = {"ref_logp": inputs["ref_logp"], "ref_lse": inputs["ref_lse"]}
        else:
            reference = {"ref_logits": self._reference_logits(inputs, rows)}
        logits = model(
            input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], logits_to_keep=rows
        ).logits
        loss, metrics = shiq_loss(
            logits,
            input_ids=inputs["input_ids"],
            act_mask=inputs["act_mask"],
            rewards=inputs["rewards"],
            beta=self.args.beta,
            gamma=self.args.gamma,
            truncated=inputs["truncated"],
            loss_type=self.args.loss_type,
            q_model=self.args.q_model,
            logit_rows=rows,
            **reference,
        )
        self.record_metrics(metrics, model.training)
        return (loss, {"logits": logits}) if return_outputs else loss
