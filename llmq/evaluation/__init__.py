"""Evaluation on benchmark task specs (``eval/*.yaml``): generation, answer scoring, intervals, reports."""

from llmq.evaluation.run import EvalConfig, bootstrap_interval, evaluate, pass_at_k

__all__ = ["EvalConfig", "bootstrap_interval", "evaluate", "pass_at_k"]
