"""Ablation: Digi-Q's Best-of-N extraction vs filtered behaviour cloning on the same offline data.

    llmq train recipes/digiq/textworld_smollm2.yaml          # first: the Digi-Q run this compares with
    python bench/digiq_vs_filtered_bc.py                     # then: filtered BC from its trajectories

Filtered BC (the usual baseline of Digi-Q, DigiRL and ArCHer) fine-tunes the same base LM, with the
recipe's actor settings, on the logged (state, command) pairs of the *won* behaviour episodes: no
critic, no candidate ranking.  It plays the recipe's held-out test games, and the script prints its
success rate and normalised score next to the base model's and Digi-Q's (from the run's ``summary.json``), with
the paired per-game differences between the three, and writes JSON.  Training data and test games are exactly
those of the Digi-Q run.
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
    from llmq.envs.textworld import AGENT_METRICS, agent_scores, evaluate_agent, likelihood_policy, policy_example
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

    def per_game(report: dict, metric: str) -> list[float]:
        return [float(game[AGENT_METRICS[metric]]) for game in report["games"]]

    reports = {"base": digiq["before"], "filtered_bc": after, "digiq": digiq["after"]}
    pairs = (("filtered_bc", "base"), ("digiq", "base"), ("digiq", "filtered_bc"))
    result = {
        "recipe": args.recipe,
        "test_games": len(test_games),
        "base": agent_scores(digiq["before"]["games"]),
        "filtered_bc": {
            "rows": len(rows),
            **agent_scores(after["games"]),
            "train_loss": train_metrics.get("train_loss"),
            "wall_s": round(seconds, 1),
            "games": after["games"],
        },
        "digiq": {"rows": digiq["extraction"]["kept"], **agent_scores(digiq["after"]["games"])},
        "paired": {
            metric: {
                f"{a}_minus_{b}": paired_difference(
                    per_game(reports[b], metric), per_game(reports[a], metric), seed=training_args.seed
                )
                for a, b in pairs
            }
            for metric in AGENT_METRICS
        },
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "machine": platform.platform(),
    }
    print(
        f"{len(test_games)} test games; filtered BC on {len(rows)} rows ({seconds:.0f} s, peak RSS "
        f"{result['peak_rss_gib']:.2f} GiB), Digi-Q on {result['digiq']['rows']}"
    )
    for metric in AGENT_METRICS:
        means = ", ".join(f"{name} {result[name][metric]:.3f}" for name in ("base", "filtered_bc", "digiq"))
        changes = ", ".join(
            f"{a} − {b} {change['mean']:+.3f} ({change['ci95_paired'][0]:+.3f} to {change['ci95_paired'][1]:+.3f})"
            for (a, b), change in zip(pairs, result["paired"][metric].values())
        )
        print(f"{metric}: {means}; paired 95% CI: {changes}")
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
