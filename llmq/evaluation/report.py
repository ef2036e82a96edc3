"""Evaluation reports: metrics with intervals from the scored completions, ``report.md``, and the
one-line console summary.  Intervals come from :mod:`llmq.stats`: Wilson for accuracies (never
zero-width), a bootstrap for pass@k estimates."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from llmq.decoding.best_of_n import majority_vote
from llmq.stats import pass_at_k, probability_interval, proportion_summary
from llmq.visualize import plot_accuracy_vs_tokens


def score_records(records: list[dict], num_samples: int, num_candidates: int, selecting: bool) -> dict:
    """``metrics``, ``pass_at_k`` and ``per_question`` of a report from the completion records of
    every question (in order).  ``selecting``: the records come from best-of-N or maj@N, whose
    candidates' verdicts are the sampler's."""
    correct, formatted, passed, majority = [], [], [], []
    for record in records:
        answers = record["verdicts"]
        correct.append(answers[0]["correct"])
        formatted.append(answers[0]["formatted"])
        passed.append(any(v["correct"] for v in answers))
        voted = answers[majority_vote([v["answer"] for v in answers])]
        majority.append(voted["answer"] is not None and voted["correct"])

    # pass@k of the sampler for every k up to its N answers: an accuracy at k answers' tokens.
    sampled = [
        [c["correct"] for c in r["candidates"]] if selecting else [v["correct"] for v in r["verdicts"]]
        for r in records
    ]
    answers_per_question = min(len(group) for group in sampled)
    curve = {}
    for k in range(1, answers_per_question + 1 if answers_per_question > 1 else 1):
        estimates = np.array([pass_at_k(len(group), sum(group), k) for group in sampled])
        low, high = probability_interval(estimates)
        curve[str(k)] = {"mean": float(estimates.mean()), "ci95": [low, high]}
    metrics = {"first_sample": proportion_summary(correct), "answer_format": proportion_summary(formatted)}
    if num_samples > 1:
        metrics |= {
            f"pass@{num_samples}": proportion_summary(passed),
            f"maj@{num_samples}": proportion_summary(majority),
        }
    if selecting:
        metrics[f"candidates_pass@{num_candidates}"] = proportion_summary([any(group) for group in sampled])
    return {
        "metrics": metrics,
        "pass_at_k": curve,
        "per_question": {"first_sample": [int(c) for c in correct], "answer_format": [int(f) for f in formatted]},
    }


def write_reports(report: dict, output_dir: Path, compare_with: list[str]) -> None:
    """``report.json``, and ``report.md`` and ``accuracy_vs_tokens.png`` with the reports of ``compare_with`` beside
    it."""
    (output_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    reports = [report] + [json.loads((Path(other) / "report.json").read_text()) for other in compare_with]
    (output_dir / "report.md").write_text(format_markdown(reports))
    plot_accuracy_vs_tokens(reports, output_dir / "accuracy_vs_tokens.png", [decoding_label(r) for r in reports])


def decoding_label(report: dict) -> str:
    """A short name of a report's decoding, e.g. ``greedy``, ``T=0.7 ×8``, ``beam 4``, ``best_of_n 8
    (implicit_reward)``."""
    decoding = report["protocol"]["decoding"]
    mode = decoding.get("decoding", "sample")
    if mode == "beam":
        label = f"beam {decoding['num_beams']}"
    elif mode == "qstar":
        label = f"Q* (K={decoding['search_candidates']}, budget {decoding['search_budget']})"
    elif mode in ("best_of_n", "maj_at_n"):
        label = f"{mode} {decoding['num_candidates']} ({decoding['scorer']})"
    elif decoding["temperature"] == 0 or mode == "greedy":
        label = "greedy"
    else:
        label = f"T={decoding['temperature']}"
    if decoding.get("guide_model") and mode in ("guided", "beam"):
        label += (
            f", guided by {Path(decoding['guide_model']).name} "
            f"(β_dec={decoding.get('guidance_temperature') or decoding['guide_beta']})"
        )
    if decoding["num_samples"] > 1:
        label += f" ×{decoding['num_samples']}"
    return label


def format_markdown(reports: list[dict]) -> str:
    """A Markdown summary: the protocol of the first report and one metrics row per report."""
    protocol = reports[0]["protocol"]
    lines = [
        f"# {protocol['task']} {protocol['split']}: {protocol['model']}",
        "",
        f"{protocol['examples']} questions, 0-shot chat prompt, scorer `{protocol['scorer']}`, "
        f"at most {protocol['decoding']['max_new_tokens']} new tokens.",
        "",
        "```",
        protocol["prompt"],
        "```",
        "",
        "| model | decoding | metric | accuracy | 95% CI | correct | tokens / question | wall s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for report in reports:
        examples = report["protocol"]["examples"]
        for name, metric in report["metrics"].items():
            low, high = metric["ci95"]
            lines.append(
                f"| {report['protocol']['model']} | {decoding_label(report)} | {name} | {100 * metric['mean']:.1f}% "
                f"| {100 * low:.1f}–{100 * high:.1f}% "
                f"| {metric['count']}/{examples} | {report['generated_tokens'] / examples:.0f} | "
                f"{report['wall_time_s']:.0f} |"
            )
    for report in reports:
        if report.get("pass_at_k"):
            curve = ", ".join(f"k={k}: {100 * value['mean']:.1f}%" for k, value in report["pass_at_k"].items())
            lines.append(
                f"\npass@k of the sampled answers of {report['protocol']['model']}, {decoding_label(report)} "
                f"(unbiased estimate, Chen et al. 2021): {curve}"
            )
    return "\n".join(lines) + "\n"


def format_report(report: dict) -> str:
    protocol = report["protocol"]
    lines = [
        f"{protocol['task']} {protocol['split']} · {protocol['examples']} questions · {protocol['model']} · "
        f"{decoding_label(report)}"
    ]
    for name, metric in report["metrics"].items():
        low, high = metric["ci95"]
        lines.append(
            f"  {name:>13}: {100 * metric['mean']:5.1f}%  (95% CI {100 * low:.1f}–{100 * high:.1f}%, "
            f"{metric['count']}/{protocol['examples']})"
        )
    lines.append(f"  {report['generated_tokens']} tokens generated in {report['wall_time_s']:.1f} s of generation")
    return "\n".join(lines)
