"""Benchmark: Q* search against greedy, sampling pass@k and best-of-N, at the tokens each one samples.

    python bench/qstar_vs_sampling.py                      # products_3x1digit, the first 100 test questions
    python bench/qstar_vs_sampling.py --limit 50 --budgets 4
    python bench/qstar_vs_sampling.py --limit 200 --qvms base_labels --engine vllm --batch_size 16 --seed 1 \
        --output_dir outputs/bench/qstar_vs_sampling/seed1 --tree_to outputs/bench/qstar_vs_sampling/seed1/tree.html \
        --prm outputs/prm_products_smollm2     # a PRM from examples/train_prm_with_trl.py
    python bench/qstar_vs_sampling.py --task gsm8k --limit 128 --budgets 8 16 --engine vllm --batch_size 16 \
        --output_dir outputs/bench/qstar_vs_sampling/gsm8k --tree_to outputs/bench/qstar_vs_sampling/gsm8k/tree.html

1. trains the task's QVMs unless they exist: on products_3x1digit those of ``recipes/qstar/products_smollm2.yaml``
   (labels sampled by the base model) and ``recipes/qstar/products_shiq_labels_smollm2.yaml`` (labels sampled by the
   online ShiQ policy), on GSM8K that of ``recipes/qstar/gsm8k_smollm2.yaml``, or only those of ``--qvms``; reads
   each one's positive-label rate and held-out within-question pairwise accuracy; the QVM that ranks held-out train
   answers better is the one best-of-N and Q* use;
2. runs ``llmq eval --engine ENGINE --seed SEED`` on the first ``--limit`` test questions (the base model, at the
   temperature and answer length of that QVM's recipe: T 0.8 and 64 tokens on products_3x1digit): greedy; N sampled
   answers (pass@k for every k ≤ N; pass@N is best-of-N by the verifier, the upper bound that reads the gold answer);
   best-of-N of those same answers by the QVM, and by the process reward model at ``--prm`` (min over its step
   scores) when one is given; Q* at each budget, with g ≡ 0
   and with the rules' utility (−1 for a step with a false equation, min over the steps), or those of
   ``--utilities`` (also ``qvm``, the QVM's value of each step, and ``prm``, the PRM's step score);
3. prints and writes (``--output_dir/report.json``) each run's accuracy (Wilson interval), sampled tokens, paired
   change from greedy (Newcombe); maj@N of the N sampled answers (self-consistency, the peer that needs no scorer)
   and each best-of-N's paired difference from it; for each Q* run the fraction of the greedy → pass@k gap it
   closes, with k the number of sampled answers whose tokens Q* spent (at least 1, at most N), and its bootstrap
   interval over questions, and Q*'s paired difference from best-of-k by the QVM (and by the PRM) at those equal
   tokens (exact over the k-subsets of the N scored answers); copies the search tree of a question Q* solved to
   ``--tree_to``.  Every run resumes from its cached completions.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from llmq.config import load_recipe_file
from llmq.decoding.best_of_n import majority_vote
from llmq.stats import best_of_k, paired_difference, pass_at_k, proportion_summary

# Each task's QVM recipes (their sampling temperature and answer length are the decoding runs' too) and how deep
# Q* may search: an answer to products_3x1digit takes one to three lines, one to GSM8K up to about ten.
TASKS = {
    "products_3x1digit": {
        "qvms": {
            "base_labels": "recipes/qstar/products_smollm2.yaml",
            "shiq_labels": "recipes/qstar/products_shiq_labels_smollm2.yaml",
        },
        "max_depth": 4,
    },
    "gsm8k": {"qvms": {"base_labels": "recipes/qstar/gsm8k_smollm2.yaml"}, "max_depth": 12},
}


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="products_3x1digit", choices=list(TASKS))
    parser.add_argument("--limit", type=int, default=100, help="First N test questions.")
    parser.add_argument("--samples", type=int, default=8, help="N: sampled answers per question (pass@k, best-of-N).")
    parser.add_argument("--budgets", type=int, nargs="+", default=[4, 8], help="Q* expansions per question.")
    parser.add_argument("--candidates", type=int, default=4, help="Q* candidate steps per expansion.")
    parser.add_argument(
        "--utilities",
        nargs="+",
        default=["none", "rules"],
        choices=["none", "rules", "qvm", "prm"],
        help="Q*'s search_utility (prm: the model at --prm).",
    )
    parser.add_argument(
        "--qvms",
        nargs="+",
        choices=sorted({name for task in TASKS.values() for name in task["qvms"]}),
        help="QVMs to train and choose the search's from; default all of the task's.",
    )
    parser.add_argument("--engine", default="hf", choices=["hf", "vllm"], help="llmq eval's engine for every run.")
    parser.add_argument("--seed", type=int, default=0, help="llmq eval's seed (the sampled answers and proposals).")
    parser.add_argument(
        "--batch_size", type=int, default=4, help="Questions per batch of the sampled runs (N answers to each)."
    )
    parser.add_argument("--prm", help="A process reward model (prm_path) to add best-of-N by its min step score.")
    parser.add_argument("--output_dir", type=Path, default=Path("outputs/bench/qstar_vs_sampling"))
    parser.add_argument(
        "--tree_to",
        type=Path,
        default=Path("docs/qstar_search_tree.html"),
        help="Where a solved question's tree goes.",
    )
    return parser


def llmq(*args: str, log: Path) -> None:
    command = [sys.executable, "-m", "llmq.cli", *args]
    print(" ".join(command), flush=True)
    with open(log, "a") as handle:
        subprocess.run(command, check=True, stdout=handle, stderr=subprocess.STDOUT)


def records(run_dir: Path) -> list[dict]:
    by_index = {}
    for line in (run_dir / "completions.jsonl").read_text().splitlines():
        record = json.loads(line)
        by_index[record["index"]] = record
    return [by_index[i] for i in sorted(by_index)]


def main(argv: list[str] | None = None) -> None:
    parser = make_parser()
    args = parser.parse_args(argv)
    if "prm" in args.utilities and args.prm is None:
        parser.error("--utilities prm needs --prm, the process reward model")
    task = TASKS[args.task]
    names = args.qvms or list(task["qvms"])
    if unknown := [name for name in names if name not in task["qvms"]]:
        parser.error(f"--qvms {' '.join(unknown)}: task {args.task} has only {', '.join(task['qvms'])}")
    out = args.output_dir
    out.mkdir(parents=True, exist_ok=True)
    log = out / "runs.log"
    qvms, recipes = {}, {}
    for name in names:
        recipe = task["qvms"][name]
        recipes[name] = load_recipe_file(recipe)
        directory = Path(recipes[name]["output_dir"])
        if not (directory / "summary.json").is_file():
            llmq("train", recipe, "--resume", log=log)
        summary = json.loads((directory / "summary.json").read_text())
        qvms[name] = {
            "path": str(directory),
            "label_source": summary["label_source"],
            "positive_label_rate": summary["positive_label_rate"],
            "heldout_ranking": summary["heldout_ranking"],
        }

    # The QVM that ranks held-out train answers better guides the search (chosen without the test split).
    chosen = max(qvms, key=lambda name: qvms[name]["heldout_ranking"]["pairwise_accuracy"] or 0.0)
    # Every run decodes as the chosen QVM's sampler did: its temperature and its answers' length.
    max_new_tokens, temperature = recipes[chosen]["max_new_tokens"], recipes[chosen]["sampling_temperature"]
    common = ["eval", "--task", args.task, "--limit", str(args.limit), "--max_new_tokens", str(max_new_tokens)]
    common += ["--engine", args.engine, "--seed", str(args.seed)]
    # The same batches and seeds: best-of-N scores the very answers of pass@N.
    sampled = ["--temperature", str(temperature), "--batch_size", str(args.batch_size)]
    runs = {
        "greedy": [*common, "--decoding", "greedy", "--batch_size", "32"],
        f"sample{args.samples}": [*common, *sampled, "--num_samples", str(args.samples)],
        f"best_of_{args.samples}_qvm": [*common, *sampled, "--decoding", "best_of_n", "--scorer", "qvm"],
    }
    runs[f"best_of_{args.samples}_qvm"] += ["--qvm_path", qvms[chosen]["path"], "--num_candidates", str(args.samples)]
    scorers = ["qvm"]
    if args.prm is not None:
        scorers.append("prm")
        runs[f"best_of_{args.samples}_prm"] = [*common, *sampled, "--decoding", "best_of_n", "--scorer", "prm"]
        runs[f"best_of_{args.samples}_prm"] += ["--prm_path", args.prm, "--search_aggregate", "min"]
        runs[f"best_of_{args.samples}_prm"] += ["--num_candidates", str(args.samples)]
    for budget in args.budgets:
        for utility in args.utilities:
            runs[f"qstar_b{budget}_{utility}"] = [
                *common,
                *sampled,
                "--decoding",
                "qstar",
                "--qvm_path",
                qvms[chosen]["path"],
                "--search_budget",
                str(budget),
                "--search_candidates",
                str(args.candidates),
                "--search_utility",
                utility,
                "--search_aggregate",
                "min",
                *(["--prm_path", args.prm] if utility == "prm" else []),
                "--step_max_tokens",
                "64",
                "--search_max_depth",
                str(task["max_depth"]),
            ]
    for name, command in runs.items():
        if not (out / name / "report.json").is_file():
            llmq(*command, "--output_dir", str(out / name), log=log)

    answers = {name: records(out / name) for name in runs}
    # Each run's per-question outcome: its first (or selected) answer is right.
    outcomes_of = {name: np.array([r["verdicts"][0]["correct"] for r in answers[name]], dtype=float) for name in runs}
    greedy = outcomes_of["greedy"]
    samples = answers[f"sample{args.samples}"]
    # Self-consistency, the peer that needs no scorer: the most frequent answer among the same N sampled answers.
    majority = np.array(
        [r["verdicts"][majority_vote([v["answer"] for v in r["verdicts"]])]["correct"] for r in samples], dtype=float
    )
    correct_counts = [sum(v["correct"] for v in r["verdicts"]) for r in samples]
    # The same N answers, each with its score by each scorer.
    scored = {scorer: answers[f"best_of_{args.samples}_{scorer}"] for scorer in scorers}
    sampler_tokens = sum(r["generated_tokens"] for r in samples)
    tokens_per_answer = sampler_tokens / (len(samples) * args.samples)
    table = {}
    for name in runs:
        if name.startswith("sample"):
            continue
        outcomes = outcomes_of[name]
        tokens = sum(r["generated_tokens"] for r in answers[name])
        row = proportion_summary(outcomes.astype(bool).tolist()) | {"sampled_tokens": tokens}
        row["vs_greedy"] = paired_difference(greedy, outcomes)
        if name.startswith("best_of"):
            row["vs_maj_at_n"] = paired_difference(majority, outcomes)
        if name == f"best_of_{args.samples}_prm":  # two scorers of the same answers
            row["vs_best_of_n_qvm"] = paired_difference(outcomes_of[f"best_of_{args.samples}_qvm"], outcomes)
        if name.startswith("qstar"):
            k = int(min(args.samples, max(1, round(tokens / len(outcomes) / tokens_per_answer))))
            at_k = np.array([pass_at_k(args.samples, c, k) for c in correct_counts])
            rng = np.random.default_rng(0)
            ratios = []
            for _ in range(2000):
                pick = rng.integers(0, len(outcomes), len(outcomes))
                gap = at_k[pick].mean() - greedy[pick].mean()
                if gap > 0:
                    ratios.append((outcomes[pick].mean() - greedy[pick].mean()) / gap)
            gap = at_k.mean() - greedy.mean()
            row["equal_token_pass_at_k"] = {"k": k, "mean": float(at_k.mean())}
            # The peers at equal tokens: best-of-k by the same QVM (and the PRM), exact over the k-subsets of the N
            # scored answers.
            for scorer in scorers:
                peer_at_k = np.array(
                    [
                        best_of_k([c["score"] for c in r["candidates"]], [c["correct"] for c in r["candidates"]], k)
                        for r in scored[scorer]
                    ]
                )
                row[f"equal_token_best_of_k_{scorer}"] = {"k": k, "mean": float(peer_at_k.mean())}
                row[f"vs_equal_token_best_of_k_{scorer}"] = paired_difference(peer_at_k, outcomes)
            row["gap_closed"] = {
                "mean": float((outcomes.mean() - greedy.mean()) / gap) if gap > 0 else None,
                "ci95_bootstrap": [float(np.percentile(ratios, 2.5)), float(np.percentile(ratios, 97.5))],
            }
        table[name] = row
    table[f"maj_at_{args.samples}"] = proportion_summary(majority.astype(bool).tolist()) | {
        "sampled_tokens": sampler_tokens,
        "vs_greedy": paired_difference(greedy, majority),
    }
    curve = {
        str(k): float(np.mean([pass_at_k(args.samples, c, k) for c in correct_counts]))
        for k in range(1, args.samples + 1)
    }
    report = {
        "task": args.task,
        "questions": args.limit,
        "engine": args.engine,
        "seed": args.seed,
        "qvms": qvms,
        "qvm_used": chosen,
        "prm": args.prm,
        "runs": table,
        "pass_at_k": curve,
        "sampled_tokens_per_answer": tokens_per_answer,
        "commands": {name: " ".join(["llmq", *command]) for name, command in runs.items()},
    }
    # The search tree of the first question that Q* (largest budget, last utility) solved, for docs/.
    searched = f"qstar_b{max(args.budgets)}_{args.utilities[-1]}"
    solved = next((r["index"] for r in answers[searched] if r["verdicts"][0]["correct"]), None)
    if solved is not None:
        args.tree_to.write_text((out / searched / "search_trees" / f"{solved}.html").read_text())
        report["search_tree"] = {"run": searched, "question": solved, "page": str(args.tree_to)}
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    for name, qvm in qvms.items():
        ranking = qvm["heldout_ranking"]
        print(f"QVM {name}: {qvm['positive_label_rate']:.1%} positive labels; held-out ranking {ranking}")
    print("pass@k of the sampler:", {k: round(v, 3) for k, v in curve.items()})
    for name, row in table.items():
        change = row["vs_greedy"]
        line = (
            f"{name}: {row['mean']:.3f} {row['ci95']}, {row['sampled_tokens']} tokens, vs greedy {change['mean']:+.3f}"
        )
        line += f" {change['ci95_paired']}"
        if "vs_maj_at_n" in row:
            line += f", vs maj@N {row['vs_maj_at_n']['mean']:+.3f} {row['vs_maj_at_n']['ci95_paired']}"
        if "vs_best_of_n_qvm" in row:
            line += f", vs best-of-N by the QVM {row['vs_best_of_n_qvm']['mean']:+.3f}"
            line += f" {row['vs_best_of_n_qvm']['ci95_paired']}"
        if "gap_closed" in row:
            equal = row["equal_token_pass_at_k"]
            line += f"; pass@{equal['k']} at equal tokens {equal['mean']:.3f}"
            line += f", gap closed {row['gap_closed']}"
            for scorer in scorers:
                peer, versus = row[f"equal_token_best_of_k_{scorer}"], row[f"vs_equal_token_best_of_k_{scorer}"]
                line += f"; best-of-{peer['k']} by the {scorer.upper()} {peer['mean']:.3f}, Q* minus it"
                line += f" {versus['mean']:+.3f} {versus['ci95_paired']}"
        print(line)


if __name__ == "__main__":
    main()
