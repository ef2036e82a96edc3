"""Datasets: evaluation task specs (``eval/*.yaml``) and their rows, from a local copy or the Hub."""

from llmq.data.tasks import TaskSpec, load_task, load_task_rows, task_scorer

__all__ = ["TaskSpec", "load_task", "load_task_rows", "task_scorer"]
