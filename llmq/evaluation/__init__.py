"""Running a model on a task: ``llmq eval`` reports and ``llmq generate`` scored datasets."""

from llmq.evaluation.generate import GenerateConfig, build_offline_dataset
from llmq.evaluation.report import format_report
from llmq.evaluation.run import EvalConfig, evaluate

__all__ = ["EvalConfig", "GenerateConfig", "build_offline_dataset", "evaluate", "format_report"]
