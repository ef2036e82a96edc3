"""TRL-style metric logging for llmq's trainers: a loss's metrics averaged over the logging interval."""

from __future__ import annotations

from collections import defaultdict

import torch
from transformers import Trainer


class LossMetricsTrainer(Trainer):
    """A ``Trainer`` whose ``compute_loss`` hands the loss function's metrics to :meth:`record_metrics`;
    each log line then carries their means since the previous one (``eval_``-prefixed in evaluation)."""

    def __init__(self, *args, **kwargs) -> None:
        self._metrics: dict[str, dict[str, list[float]]] = {"train": defaultdict(list), "eval": defaultdict(list)}
        super().__init__(*args, **kwargs)

    def record_metrics(self, metrics: dict[str, torch.Tensor], training: bool) -> None:
        """Keep every metric but ``loss`` (the Trainer logs that itself)."""
        mode = "train" if training else "eval"
        for name, value in metrics.items():
            if name != "loss":
                self._metrics[mode][name].append(float(value))

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
