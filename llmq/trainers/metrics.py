"""The common base of llmq's trainers: TRL-style metric logging, a stop on a non-finite loss, and a clean
failure when a checkpoint cannot be written."""

from __future__ import annotations

import os
import shutil
from collections import defaultdict
from pathlib import Path

import torch
from safetensors import SafetensorError
from transformers import PreTrainedModel, Trainer
from transformers.integrations import is_deepspeed_zero3_enabled
from transformers.trainer import TRAINING_ARGS_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from llmq.checkpoints import TRAINER_STATE, complete_checkpoints, is_complete, save_partitioned_weights
from llmq.errors import NonFiniteLossError, UserError


class LossMetricsTrainer(Trainer):
    """A ``Trainer`` whose ``compute_loss`` hands the loss function's metrics to :meth:`record_metrics`;
    each log line then carries their means since the previous one, averaged over the training
    processes (``eval_``-prefixed in evaluation).

    A NaN or infinite training loss stops the run before the optimizer applies it: the weights of
    the last finished step are saved as a full checkpoint (resumable with ``resume_from_checkpoint``)
    and :class:`llmq.errors.NonFiniteLossError` names the step and the checkpoint.

    A checkpoint that cannot be written (a full disk, a file-size limit) is removed, so that only
    complete checkpoints remain to resume from, and :class:`llmq.errors.UserError` names the step,
    the OS error and the last good checkpoint.
    """

    def __init__(self, *args, **kwargs) -> None:
        self._metrics: dict[str, dict[str, list[torch.Tensor]]] = {
            "train": defaultdict(list),
            "eval": defaultdict(list),
        }
        super().__init__(*args, **kwargs)

    def record_metrics(self, metrics: dict[str, torch.Tensor], training: bool) -> None:
        """Keep every metric but ``loss`` (the Trainer logs that itself), as detached tensors: no
        host sync per step.  A per-row metric (a vector, e.g. ``rewards``) is gathered from every process and kept
        as its ``/mean`` and ``/std`` over the whole batch, as TRL's trainers summarise rewards."""
        mode = "train" if training else "eval"
        for name, value in metrics.items():
            value = torch.as_tensor(value, dtype=torch.float32).detach()
            if name == "loss":
                continue
            if value.dim() == 0:
                self._metrics[mode][name].append(value)
                continue
            rows = self.accelerator.gather(value.to(self.accelerator.device))
            self._metrics[mode][f"{name}/mean"].append(rows.mean())
            self._metrics[mode][f"{name}/std"].append(rows.std() if rows.numel() > 1 else torch.zeros_like(rows[0]))

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        if not torch.isfinite(loss).all():
            model.zero_grad(set_to_none=True)  # the optimizer never sees this step
            self._save_checkpoint(model, trial=None)
            folder = os.path.join(self.args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
            raise NonFiniteLossError(
                f"the training loss became {loss.item()} at step {self.state.global_step + 1}; the weights of step "
                f"{self.state.global_step} "
                f"are saved in {folder} (resume_from_checkpoint: {folder}); lower learning_rate or check the data's "
                "rewards"
            )
        return loss

    def _save_checkpoint(self, model, trial) -> None:
        run_dir = self._get_output_dir(trial=trial)
        folder = Path(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        if self.args.should_save:
            # A save into an existing folder overwrites it: it is incomplete until the Trainer writes this file again,
            # last.
            (folder / TRAINER_STATE).unlink(missing_ok=True)
        try:
            super()._save_checkpoint(model, trial)
        except Exception as error:
            if is_complete(
                folder
            ):  # the checkpoint was saved; what failed came after (rotating old ones, pushing to the Hub)
                raise
            if self.args.should_save:  # the process that wrote the folder removes it
                shutil.rmtree(folder, ignore_errors=True)
            if not _is_write_failure(error):
                raise
            good = complete_checkpoints(run_dir)
            if good:
                last = (
                    f"the last good checkpoint is {good[0]}; free disk space (or raise the file size limit) and "
                    f"resume from it (llmq train --resume, or resume_from_checkpoint: {good[0]})"
                )
            else:
                last = "there is no earlier checkpoint; free disk space (or raise the file size limit) and start again"
            free = (
                f"; {shutil.disk_usage(run_dir).free / 2**20:.0f} MiB free on that disk"
                if os.path.isdir(run_dir)
                else ""
            )
            raise UserError(
                f"could not save the checkpoint of step {self.state.global_step} in {folder} "
                f"({type(error).__name__}: {' '.join(str(error).split())}{free}); "
                f"the partial folder was removed and {last}"
            ) from None

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Under ZeRO-3 the weights are gathered and written one shard at a time
        (:func:`llmq.checkpoints.save_partitioned_weights`), so the save never holds the whole model in one process as
        the Trainer's does; otherwise (PEFT adapters, which are small, and models without a transformers config
        included) the Trainer saves."""
        model = self.accelerator.unwrap_model(self.model)
        if not (self.is_deepspeed_enabled and is_deepspeed_zero3_enabled()) or not isinstance(model, PreTrainedModel):
            return super().save_model(output_dir, _internal_call)
        folder = Path(output_dir if output_dir is not None else self.args.output_dir)
        save_partitioned_weights(model, folder, write=self.args.should_save)
        if self.args.should_save:
            model.config.save_pretrained(folder)
            if model.can_generate() and model.generation_config is not None:
                model.generation_config.save_pretrained(folder)
            if self.processing_class is not None:
                self.processing_class.save_pretrained(folder)
            torch.save(self.args, folder / TRAINING_ARGS_NAME)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "eval" if any(key.startswith("eval_") for key in logs) else "train"
        prefix = "eval_" if mode == "eval" else ""
        metrics = self._metrics[mode]
        if metrics:
            # Every process logs the same metrics at the same steps, as TRL's trainers: one gather of all their
            # means, then the mean over processes, and one host sync per log line.
            means = torch.stack([torch.stack(values).mean() for values in metrics.values()]).to(
                self.accelerator.device
            )
            gathered = self.accelerator.gather(means[None]).mean(dim=0).tolist()
            logs |= {prefix + name: value for name, value in zip(metrics, gathered)}
        metrics.clear()
        super().log(logs, start_time)


def _is_write_failure(error: Exception) -> bool:
    """An OS error while writing, including the forms safetensors and ``torch.save`` give it (neither raises
    OSError)."""
    if isinstance(error, (OSError, SafetensorError)):
        return True
    # torch.save reports a failed write from its zip writer (caffe2/serialize/inline_container.cc).
    return isinstance(error, RuntimeError) and "inline_container" in str(error)
