"""Benchmark: best-of-N sampling throughput, VLLMEngine vs HFEngine, same prompts and settings.

    make vllm-env && .venv-vllm/bin/python bench/engines_best_of_n.py   # needs vLLM: run it in .venv-vllm
    .venv-vllm/bin/python bench/engines_best_of_n.py --n 16 --max_new_tokens 256

N samples for each of P GSM8K test questions (the local copy under --data_dir, else built-in
GSM8K-style questions), rendered as `llmq eval --task gsm8k` renders them (eval/gsm8k.yaml), at
temperature T with the same seed. Each engine runs in its own process, so that its peak RSS is its
own; each first generates one short warm-up sample (untimed: vLLM sets up kernels on its first
batch), then all P×N samples in one `generate` call. Prints generated tokens/s of each, the
vLLM/HF ratio and peak RSS, and writes JSON. Samples stop at EOS, so the engines generate different
numbers of tokens; tokens/s counts each engine's own.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FALLBACK_QUESTIONS = [
    "Janet has 3 apples. She buys 5 more and gives 2 to her brother. How many apples does she have now?",
    "A train travels 60 miles per hour for 3 hours. How many miles does it travel?",
    "Tom reads 12 pages a day. How many pages does he read in 2 weeks?",
    "A shirt costs $20 and is on sale for 25% off. What is the sale price?",
    "There are 4 boxes with 9 pencils each. 7 pencils are lost. How many pencils are left?",
    "Maria earns $15 per hour and works 6 hours a day for 5 days. How much does she earn?",
    "A farmer has 48 eggs and packs them in cartons of 6. How many cartons does he fill?",
    "Sam is 3 times as old as his son, who is 8. How old will Sam be in 4 years?",
]


def prompts(data_dir: Path, count: int) -> tuple[list, str]:
    import yaml

    template = yaml.safe_load((REPO / "eval" / "gsm8k.yaml").read_text())["prompt"]
    source = data_dir / "gsm8k" / "test.jsonl"
    if source.is_file():
        questions = [json.loads(line)["question"] for line in source.read_text().splitlines()[:count]]
        origin = str(source)
    else:
        questions = (FALLBACK_QUESTIONS * (count // len(FALLBACK_QUESTIONS) + 1))[:count]
        origin = "built-in GSM8K-style questions"
    return [[{"role": "user", "content": template.format(question=q)}] for q in questions], origin


def run_one(engine_name: str, args: argparse.Namespace) -> dict:
    import torch

    from llmq.rollout import SamplingParams

    questions, origin = prompts(Path(args.data_dir), args.prompts)
    started = time.perf_counter()
    if engine_name == "vllm":
        from llmq.rollout import VLLMEngine

        engine = VLLMEngine(args.model, dtype="float32", seed=args.seed)
        dtype = "float32"
    else:
        from llmq.models import load_model, load_tokenizer
        from llmq.rollout import HFEngine

        model = load_model(args.model, dtype="float32")
        engine = HFEngine(model, load_tokenizer(args.model), batch_size=args.prompts, progress=False)
        dtype = str(model.dtype)
    load_s = time.perf_counter() - started
    engine.generate(
        questions[:1], n=1, sampling=SamplingParams(max_new_tokens=8, temperature=args.temperature, seed=args.seed + 1)
    )  # warm-up

    sampling = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=args.seed)
    started = time.perf_counter()
    results = engine.generate(questions, n=args.n, sampling=sampling)
    seconds = time.perf_counter() - started
    completions = [c for r in results for c in r]
    tokens = sum(len(c.token_ids) for c in completions)
    usage = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss + resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return {
        "engine": engine_name,
        "sequences": len(completions),
        "generated_tokens": tokens,
        "mean_tokens_per_sequence": tokens / len(completions),
        "finished_by_eos_or_stop": sum(c.finish_reason == "stop" for c in completions),
        "seconds": seconds,
        "tokens_per_s": tokens / seconds,
        "sequences_per_s": len(completions) / seconds,
        "load_s": load_s,
        "peak_rss_gib": usage * 1024 / 2**30,
        "dtype": dtype,
        "torch_threads": torch.get_num_threads(),
        "prompts_from": origin,
        "example": completions[0].text[:300],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--data_dir", default=str(REPO.parent / "shared" / "data"))
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--n", type=int, default=8, help="samples per prompt (the N of best-of-N)")
    parser.add_argument("--max_new_tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default="outputs/bench/engines_best_of_n.json")
    parser.add_argument("--only", choices=["hf", "vllm"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.only:
        print(json.dumps(run_one(args.only, args)))
        return

    settings = [
        "--model",
        args.model,
        "--data_dir",
        args.data_dir,
        "--prompts",
        str(args.prompts),
        "--n",
        str(args.n),
        "--max_new_tokens",
        str(args.max_new_tokens),
        "--temperature",
        str(args.temperature),
        "--seed",
        str(args.seed),
    ]
    results = {}
    for engine in ("vllm", "hf"):
        finished = subprocess.run(
            [sys.executable, __file__, "--only", engine, *settings], capture_output=True, text=True, check=False
        )
        if finished.returncode != 0:
            sys.exit(f"{engine} run failed:\n{finished.stderr[-3000:]}")
        results[engine] = json.loads(finished.stdout.strip().splitlines()[-1])
    vllm, hf = results["vllm"], results["hf"]
    ratios = {key: vllm[key] / hf[key] for key in ("tokens_per_s", "sequences_per_s", "peak_rss_gib")}
    import vllm as vllm_package

    report = {
        "model": args.model,
        "prompts": args.prompts,
        "n": args.n,
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "device": platform.processor() or platform.machine(),
        "vllm_version": vllm_package.__version__,
        "results": results,
        "vllm_over_hf": ratios,
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(report, indent=2) + "\n")
    print(
        f"{args.prompts} prompts x {args.n} samples, {args.max_new_tokens} new tokens max, T={args.temperature}, "
        f"{args.model} ({hf['dtype']}, {report['device']})"
    )
    print(f"{'':9}{'tokens/s':>10}{'seqs/s':>9}{'tokens':>8}{'seconds':>9}{'load s':>8}{'peak RSS GiB':>14}")
    for name, r in results.items():
        print(
            f"{name:9}{r['tokens_per_s']:10.1f}{r['sequences_per_s']:9.3f}{r['generated_tokens']:8d}{r['seconds']:9.1f}{r['load_s']:8.1f}{r['peak_rss_gib']:14.2f}"
        )
    print(
        f"{'vLLM/HF':9}{ratios['tokens_per_s']:10.3f}{ratios['sequences_per_s']:9.3f}{'':17}{'':8}{ratios['peak_rss_gib']:14.3f}"
    )
    print(f"report: {args.output}")


if __name__ == "__main__":
    main()
