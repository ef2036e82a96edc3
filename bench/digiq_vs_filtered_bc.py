"""Ablation: Digi-Q's Best-of-N extraction vs filtered behaviour cloning on the same offline data.

    llmq train recipes/digiq/textworld_smollm2.yaml          # first: the Digi-Q run this compares with
    python bench/digiq_vs_filtered_bc.py                     # then: filtered BC from its trajectories

Filtered BC (the usual baseline of Digi-Q, DigiRL and ArCHer) fine-tunes the same base LM, with the
recipe's actor settings, on the logged (state, command) pairs of the *won* behaviour episodes: no
critic, no candidate ranking.  It plays the recipe's held-out test games, and the script prints its
success next to Digi-Q's (from the run's ``summary.json``) with the paired per-game difference, and
writes JSON.  Training data and test games are exactly those of the Digi-Q run.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--recipe",
        default="recipes/digiq/textworld_smollm2.yaml",
        help="The Digi-Q recipe whose run this compares with.",
    )
    parser.add_argument("--output", default="outputs/bench/digiq_vs_filtered_bc.json")
    args = parser.parse_args()

    import datasets
    from trl import SFTTrainer

    from llmq.cli import train_config_types
    from llmq.config import parse_recipe
    from llmq.envs.textworld import evaluate_agent, likelihood_policy, policy_example
    from llmq.methods.digiq import benchmark_games
    from llmq.models import load_from_config
    from llmq.stats import paired_difference

    model_args, training_args, run, _ = parse_recipe(
        train_config_types("digiq"), [args.recipe], prog="digiq_vs_filtered_bc", description=""
    )
    run_dir = Path(training_args.output_dir)
    digiq = json.loads((run_dir / "summary.json").read_text())
    data = datasets.load_from_disk(str(run_dir / "trajectories"))
    screens = run.observations == "screen"
    rows = [policy_example(r["state"], list(r["admissible"]), r["action"], screens=screens) for r in data if r["won"]]
    _, test_games = benchmark_games(run)

    training_args.output_dir = str(run_dir / "filtered_bc")
    training_args.save_strategy = "no"
    model, tokenizer = load_from_config(model_args, device="cpu" if training_args.use_cpu else training_args.device)
    started = time.perf_counter()
    trainer = SFTTrainer(
        model=model, args=training_args, train_dataset=datasets.Dataset.from_list(rows), processing_class=tokenizer
    )
    train_metrics = trainer.train().metrics
    after = evaluate_agent(
        likelihood_policy(trainer.model.eval(), tokenizer, batch_size=run.policy_batch_size, screens=screens),
        test_games,
        run.episode_steps,
        seed=run.test_seed,
    )
    seconds = time.perf_counter() - started

    change = paired_difference(
        [float(b["won"]) for b in after["games"]],
        [float(d["won"]) for d in digiq["after"]["games"]],
        seed=training_args.seed,
    )
    low, high = change["ci95_paired"]
    result = {
        "recipe": args.recipe,
        "test_games": len(test_games),
        "before": digiq["before"]["success_rate"],
        "digiq": {
            "rows": digiq["extraction"]["kept"],
            "success_rate": digiq["after"]["success_rate"],
            "success_rate_ci95": digiq["after"]["success_rate_ci95"],
        },
        "filtered_bc": {
            "rows": len(rows),
            "success_rate": after["success_rate"],
            "success_rate_ci95": after["success_rate_ci95"],
            "train_loss": train_metrics.get("train_loss"),
            "wall_s": round(seconds, 1),
            "games": after["games"],
        },
        "digiq_minus_filtered_bc": change,
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "machine": platform.platform(),
    }
    print(
        f"success on {len(test_games)} test games: base {100 * result['before']:.1f}%, filtered BC ({len(rows)} "
        f"rows) {100 * after['success_rate']:.1f}%, "
        f"Digi-Q ({result['digiq']['rows']} rows) {100 * result['digiq']['success_rate']:.1f}%; Digi-Q − filtered "
        f"BC {100 * change['mean']:+.1f} points "
        f"(paired 95% CI {100 * low:+.1f} to {100 * high:+.1f}); filtered BC {seconds:.0f} s, peak RSS "
        f"{result['peak_rss_gib']:.2f} GiB"
    )
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
