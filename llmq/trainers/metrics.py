"""The common base of llmq's trainers: TRL-style metric logging, and a stop on a non-finite loss."""

from __future__ import annotations

import os
from collections import defaultdict

import torch
from transformers import Trainer
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from llmq.errors import NonFiniteLossError


class LossMetricsTrainer(Trainer):
    """A ``Trainer`` whose ``compute_loss`` hands the loss function's metrics to :meth:`record_metrics`;
    each log line then carries their means since the previous one (``eval_``-prefixed in evaluation).

    A NaN or infinite training loss stops the run before the optimizer applies it: the weights of
    the last finished step are saved as a full checkpoint (resumable with ``resume_from_checkpoint``)
    and :class:`llmq.errors.NonFiniteLossError` names the step and the checkpoint.
    """

    def __init__(self, *args, **kwargs) -> None:
        self._metrics: dict[str, dict[str, list[float]]] = {"train": defaultdict(list), "eval": defaultdict(list)}
        super().__init__(*args, **kwargs)

    def record_metrics(self, metrics: dict[str, torch.Tensor], training: bool) -> None:
        """Keep every metric but ``loss`` (the Trainer logs that itself)."""
        mode = "train" if training else "eval"
        for name, value in metrics.items():
            if name != "loss":
                self._metrics[mode][name].append(float(value))

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        if not torch.isfinite(loss).all():
            model.zero_grad(set_to_none=True)  # the optimizer never sees this step
            self._save_checkpoint(model, trial=None)
            folder = os.path.join(self.args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
            raise NonFiniteLossError(
                f"the training loss became {loss.item()} at step {self.state.global_step + 1}; the weights of step {self.state.global_step} "
                f"are saved in {folder} (resume_from_checkpoint: {folder}); lower learning_rate or check the data's rewards"
            )
        return loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "eval" if any(key.startswith("eval_") for key in logs) else "train"
        prefix = "eval_" if mode == "eval" else ""
        for name, values in self._metrics[mode].items():
            logs[prefix + name] = sum(values) / len(values)
        self._metrics[mode].clear()
        super().log(logs, start_time)
