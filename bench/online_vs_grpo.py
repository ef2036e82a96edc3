"""Benchmark: online ShiQ vs TRL's GRPO vs iterated DPO vs iterated rejection-sampling SFT, at equal samples.

    python bench/online_vs_grpo.py                                  # products_3x1digit, seed 0, all four
    python bench/online_vs_grpo.py --seeds 0 1 --methods shiq grpo  # other seeds, two methods

Runs ``llmq train recipes/online/{method}_{task}_smollm2.yaml --seed S`` for each method and seed
(``--resume``: a killed benchmark goes on where it stopped, a finished run is read back), then compares
the runs at every round where all of them measured held-out accuracy: each round samples the same
number of answers to the same number of prompts, so those rounds are equal sampling budgets (the
tokens each run sampled by then are reported too, as answers' lengths change with training).
Prints and writes (``--output_dir/{task}.json``, one entry per seed) each method's accuracy with its Wilson interval,
the paired change against the base model and online ShiQ's paired difference from each other method (Newcombe's
intervals), the wall time of the rounds, the update time per training token and each run's peak
memory; plots held-out accuracy against sampled tokens (``{task}_seed{S}_accuracy_vs_sampled_tokens.png``).
With several seeds it also pools them (``across_seeds`` in the JSON): each method's accuracy averaged over the
seeds, and online ShiQ's difference from each peer averaged over the seeds question by question, with a bootstrap
interval over the questions.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from llmq.checkpoints import TRAINER_STATE, complete_checkpoints
from llmq.methods.grpo import LOG_FILE as GRPO_LOG
from llmq.stats import paired_difference
from llmq.visualize import plot_accuracy_vs_sampled_tokens

METHODS = ("shiq", "grpo", "dpo", "sft")
LABELS = {
    "shiq": "online ShiQ (llmq)",
    "grpo": "GRPO (TRL GRPOTrainer)",
    "dpo": "iterated DPO",
    "sft": "iterated rejection-sampling SFT",
}


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="products", help="recipes/online/{method}_{task}_smollm2.yaml")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--output_dir", type=Path, default=Path("outputs/bench/online_vs_grpo"))
    parser.add_argument(
        "--partial", action="store_true", help="train nothing; report unfinished runs from their newest checkpoint"
    )
    return parser


def run(method: str, task: str, seed: int, output_dir: Path, partial: bool) -> dict:
    """The summary of one run, training it first (or finishing it) when it has none; with ``partial`` the log of
    an unfinished run's newest checkpoint instead (nothing is trained)."""
    run_dir = output_dir / task / f"{method}_seed{seed}"
    summary = run_dir / "summary.json"
    if summary.is_file():
        return json.loads(summary.read_text())
    if partial:
        checkpoints = complete_checkpoints(run_dir)
        if not checkpoints:
            return {}
        rounds_log = checkpoints[0] / GRPO_LOG  # GRPO's rounds; TRL's own trainer_state.json logs its steps
        if rounds_log.is_file():
            log = json.loads(rounds_log.read_text())["log"]
        else:
            log = json.loads((checkpoints[0] / TRAINER_STATE).read_text())["log_history"]
        return {"rounds": log, "partial": True, "wall_s": log[-1].get("wall_s", 0.0)}
    recipe = Path("recipes/online") / f"{method}_{task}_smollm2.yaml"
    command = [sys.executable, "-m", "llmq.cli", "train", str(recipe), "--output_dir", str(run_dir)]
    command += ["--seed", str(seed), "--resume"]
    print(" ".join(command), flush=True)
    with open(output_dir / task / f"{method}_seed{seed}.log", "a") as log:
        subprocess.run(command, check=True, stdout=log, stderr=subprocess.STDOUT)
    return json.loads(summary.read_text())


def evaluations(summaries: dict[str, dict]) -> dict[str, dict[int, dict]]:
    """Each method's held-out evaluations by round (round 0 is the base model)."""
    return {method: {e["round"]: e for e in s["rounds"] if "correct" in e} for method, s in summaries.items()}


def compare(summaries: dict[str, dict], seed: int) -> dict:
    """Every method at each round all of them evaluated: accuracy, paired change from the base, ShiQ − GRPO."""
    evaluated = evaluations(summaries)
    rounds = sorted(set.union(*(set(entries) for entries in evaluated.values())))
    base = next(iter(evaluated.values()))[0]["correct"]
    if any(entries[0]["correct"] != base for entries in evaluated.values()):
        raise SystemExit("the runs' base-model evaluations differ: they did not evaluate the same questions")
    table = []
    for round_number in rounds[1:]:
        row = {"round": round_number, "methods": {}}
        for method, entries in evaluated.items():
            if round_number not in entries:  # an unfinished run (--partial)
                continue
            entry = entries[round_number]
            row["methods"][method] = {
                "sampled_tokens": entry["sampled_tokens"],
                "accuracy": entry["accuracy"],
                "accuracy_ci95": entry["accuracy_ci95"],
                "change_from_base": paired_difference(base, entry["correct"], seed=seed),
            }
        if "shiq" in row["methods"]:
            row["shiq_minus"] = {
                peer: paired_difference(
                    evaluated[peer][round_number]["correct"], evaluated["shiq"][round_number]["correct"], seed=seed
                )
                for peer in row["methods"]
                if peer != "shiq"
            }
        table.append(row)
    return {"base_accuracy": sum(base) / len(base), "questions": len(base), "rounds": table}


def across_seeds(evaluated_by_seed: dict[int, dict[str, dict[int, dict]]]) -> dict:
    """Each method's accuracy averaged over seeds at every round all seeds and methods evaluated, and online ShiQ's
    difference from each peer: per question, averaged over seeds, with a bootstrap interval over the questions
    (the held-out questions are the same for every seed; the seeds' own spread is in the per-seed accuracies)."""
    runs = list(evaluated_by_seed.values())
    methods = sorted(set.intersection(*(set(run) for run in runs)), key=METHODS.index)
    rounds = sorted(set.intersection(*(set(run[method]) for run in runs for method in methods)))
    seed_mean = {
        (method, round_number): np.mean([run[method][round_number]["correct"] for run in runs], axis=0)
        for method in methods
        for round_number in rounds
    }
    table = []
    for round_number in rounds[1:]:
        row = {
            "round": round_number,
            "accuracy": {
                method: {
                    "mean": float(seed_mean[method, round_number].mean()),
                    "per_seed": [run[method][round_number]["accuracy"] for run in runs],
                }
                for method in methods
            },
        }
        if "shiq" in methods:
            row["shiq_minus"] = {
                peer: paired_difference(seed_mean[peer, round_number], seed_mean["shiq", round_number])
                for peer in methods
                if peer != "shiq"
            }
        table.append(row)
    return {"seeds": list(evaluated_by_seed), "rounds": table}


def print_table(comparison: dict, summaries: dict[str, dict]) -> None:
    print(f"base model: {100 * comparison['base_accuracy']:.1f}% on {comparison['questions']} held-out questions")
    for row in comparison["rounds"]:
        print(f"round {row['round']}:")
        for method, result in row["methods"].items():
            low, high = (100 * x for x in result["accuracy_ci95"])
            change = result["change_from_base"]
            print(
                f"  {LABELS[method]:34s} {100 * result['accuracy']:5.1f}% ({low:.1f}-{high:.1f}), "
                f"{100 * change['mean']:+.1f} vs base ({100 * change['ci95_paired'][0]:+.1f} to "
                f"{100 * change['ci95_paired'][1]:+.1f}), {result['sampled_tokens']} sampled tokens"
            )
        for peer, difference in row.get("shiq_minus", {}).items():
            print(
                f"  online ShiQ - {LABELS[peer]}: {100 * difference['mean']:+.1f} "
                f"({100 * difference['ci95_paired'][0]:+.1f} to {100 * difference['ci95_paired'][1]:+.1f})"
            )
    for method, summary in summaries.items():
        done = f" (unfinished: {summary['rounds'][-1]['round']} rounds)" if summary.get("partial") else ""
        print(
            f"{LABELS[method]}: {summary['wall_s'] / 60:.1f} min of rounds{done}, peak memory "
            f"{summary.get('peak_memory_mb', float('nan')):.0f} MB"
        )


def main(argv: list[str] | None = None) -> None:
    args = make_parser().parse_args(argv)
    (args.output_dir / args.task).mkdir(parents=True, exist_ok=True)
    path = args.output_dir / f"{args.task}.json"
    results = json.loads(path.read_text()) if path.is_file() else {}  # other seeds' comparisons stay
    evaluated_by_seed = {}
    for seed in args.seeds:
        summaries = {method: run(method, args.task, seed, args.output_dir, args.partial) for method in args.methods}
        summaries = {method: summary for method, summary in summaries.items() if summary}
        evaluated_by_seed[seed] = evaluations(summaries)
        comparison = compare(summaries, seed)
        print(f"--- {args.task}, seed {seed}")
        print_table(comparison, summaries)
        results[f"seed{seed}"] = comparison | {
            "runs": {
                method: {
                    key: s.get(key) for key in ("wall_s", "sampled_tokens", "peak_memory_mb", "update_tokens_per_s")
                }
                for method, s in summaries.items()
            }
        }
        curves = {LABELS[method]: [e for e in s["rounds"] if "accuracy" in e] for method, s in summaries.items()}
        task_name = next((s["task"] for s in summaries.values() if "task" in s), args.task)
        plot = args.output_dir / f"{args.task}_seed{seed}_accuracy_vs_sampled_tokens.png"
        plot_accuracy_vs_sampled_tokens(
            curves,
            plot,
            f"{task_name}: held-out accuracy (first {comparison['questions']} test questions, seed {seed})",
        )
        print(f"plot: {plot}")
    if len(evaluated_by_seed) > 1:
        pooled = across_seeds(evaluated_by_seed)
        results["across_seeds"] = pooled
        print(f"--- {args.task}, averaged over seeds {pooled['seeds']}")
        for row in pooled["rounds"]:
            accuracies = ", ".join(
                f"{LABELS[method]} {100 * a['mean']:.1f}% ({' / '.join(f'{100 * x:.1f}' for x in a['per_seed'])})"
                for method, a in row["accuracy"].items()
            )
            print(f"round {row['round']}: {accuracies}")
            for peer, difference in row.get("shiq_minus", {}).items():
                low, high = (100 * x for x in difference["ci95_paired"])
                print(f"  online ShiQ - {LABELS[peer]}: {100 * difference['mean']:+.1f} ({low:+.1f} to {high:+.1f})")
    path.write_text(json.dumps(dict(sorted(results.items())), indent=2) + "\n")
    print(f"results: {path}")


if __name__ == "__main__":
    main()
