"""Which hidden layer should Digi-Q's critic read? Out-of-fold value prediction on a run's own train data.

    llmq train recipes/digiq/coin_smollm2.yaml                  # first: the run whose logged data this reads
    python bench/digiq_feature_layers.py --recipe recipes/digiq/coin_smollm2.yaml \
        --output outputs/bench/digiq_feature_layers_coin.json

For each layer, the features of the run's logged states and commands are read as the run reads them (after the
recipe's representation fine-tuning: the run's saved adapter, or the fine-tuning repeated here with the same seed),
and the critic is fitted with the recipe's settings ``--folds`` times, each time without one fold of the train games.
Its Q of each held-out logged (state, command) is compared with the discounted return that followed in the data
(``mc_return``): the critic estimates the behaviour policy's Q, of which that return is an unbiased sample. Per
layer: the mean over games of the squared error, its bootstrap interval over games, the fraction of the return's
variance explained (against the training folds' mean return as the prediction), and the paired per-game difference
from the default (middle) layer. Only train games are read, never the test fold. Features are cached in the run's
``features/``, so a killed run resumes where it stopped.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", default="recipes/digiq/coin_smollm2.yaml", help="The Digi-Q run's recipe.")
    parser.add_argument(
        "--layers",
        type=int,
        nargs="+",
        help="hidden_states indices to compare (0 = embeddings); default a quarter, half, three quarters and all "
        "of the layers",
    )
    parser.add_argument("--folds", type=int, default=4, help="Folds of the train games (each held out once).")
    parser.add_argument("--output", default="outputs/bench/digiq_feature_layers.json")
    args = parser.parse_args()
    if args.folds < 2:
        parser.error("--folds must be at least 2")

    import datasets
    import numpy as np
    import torch

    from llmq.cli import train_config_types
    from llmq.config import parse_recipe
    from llmq.methods.digiq import (
        TransitionFeatures,
        critic_transitions,
        representation_backbone,
        saved_representation_backbone,
    )
    from llmq.models import load_from_config
    from llmq.models.features import feature_layer
    from llmq.stats import bootstrap_interval, paired_difference
    from llmq.trainers.critic import CriticTrainer

    model_args, training_args, run, _ = parse_recipe(
        train_config_types("digiq"), [args.recipe], prog="digiq_feature_layers", description=""
    )
    run_dir = Path(training_args.output_dir)
    if not (run_dir / "trajectories").is_dir():
        raise SystemExit(f"{run_dir / 'trajectories'} is missing: run `llmq train {args.recipe}` first")
    data = datasets.load_from_disk(str(run_dir / "trajectories"))
    game_of_row = np.array(data["game"])
    games = sorted(set(game_of_row))
    fold_of_game = {game: i % args.folds for i, game in enumerate(games)}
    fold = np.array([fold_of_game[g] for g in game_of_row])
    returns = np.array(data["mc_return"])

    started = time.perf_counter()
    model, tokenizer = load_from_config(model_args, device="cpu" if training_args.use_cpu else training_args.device)
    model.eval()
    backbone = model
    if run.representation_steps > 0:  # the run's own fine-tuned backbone, else the fine-tuning again, seeded alike
        backbone = saved_representation_backbone(model, run_dir / "representation")
        if backbone is None:
            backbone, _ = representation_backbone(
                model, tokenizer, data, run, training_args, run_dir / "feature_layers" / "representation"
            )
    middle = feature_layer(model, None)
    count = model.config.num_hidden_layers
    layers = sorted(
        {feature_layer(model, layer) for layer in args.layers or (count // 4, middle, 3 * count // 4, count)}
    )

    results = {}
    for layer in layers:
        layer_started = time.perf_counter()
        features = TransitionFeatures(backbone, tokenizer, data, layer, run_dir / "features")
        predicted, baseline = np.zeros(len(data)), np.zeros(len(data))
        for held_out in range(args.folds):
            train_rows = np.flatnonzero(fold != held_out).tolist()
            test_rows = np.flatnonzero(fold == held_out).tolist()
            trainer = CriticTrainer(
                args=run.critic_args(training_args, run_dir / "feature_layers" / "critic"),
                train_dataset=datasets.Dataset.from_list(critic_transitions(features, data.select(train_rows))),
            )
            trainer.train()
            critic = trainer.model.online.cpu().eval()
            held = data.select(test_rows)
            with torch.no_grad():
                q = critic.q(
                    torch.tensor([features.state(s) for s in held["state"]]),
                    torch.tensor([features.action(s, a) for s, a in zip(held["state"], held["action"])]),
                )
            predicted[test_rows] = q.mean(0).numpy()  # the heads' mean
            baseline[test_rows] = returns[train_rows].mean()
        errors = (predicted - returns) ** 2
        per_game = [float(errors[game_of_row == g].mean()) for g in games]
        mse = float(np.mean(per_game))
        results[layer] = {
            "per_game_squared_error": per_game,
            "mse": mse,
            "mse_ci95": list(bootstrap_interval(per_game, seed=training_args.seed)),
            "explained_variance": 1 - float(errors.sum() / ((baseline - returns) ** 2).sum()),
            "q_return_correlation": float(np.corrcoef(predicted, returns)[0, 1]),
            "seconds": round(time.perf_counter() - layer_started, 1),
        }
        print(
            f"layer {layer}: held-out MSE of Q vs return {mse:.4f} (95% CI {results[layer]['mse_ci95'][0]:.4f}–"
            f"{results[layer]['mse_ci95'][1]:.4f}), variance explained {results[layer]['explained_variance']:.3f}, "
            f"correlation {results[layer]['q_return_correlation']:.3f}",
            flush=True,
        )

    if middle in results:
        for result in results.values():
            result["minus_middle_paired"] = paired_difference(
                results[middle]["per_game_squared_error"], result["per_game_squared_error"], seed=training_args.seed
            )
    best = min(results, key=lambda layer: results[layer]["mse"])
    report = {
        "recipe": args.recipe,
        "model": model_args.model_name_or_path,
        "representation_steps": run.representation_steps,
        "train_games": len(games),
        "transitions": len(data),
        "folds": args.folds,
        "critic_steps": run.critic_steps,
        "middle_layer": middle,
        "layers": {str(layer): result for layer, result in results.items()},
        "lowest_mse_layer": best,
        "wall_time_s": round(time.perf_counter() - started, 1),
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(report, indent=2))
    print(f"lowest held-out MSE: layer {best} (middle layer {middle}); JSON: {args.output}")


if __name__ == "__main__":
    main()
