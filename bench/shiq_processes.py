"""Benchmark: ShiQ training throughput in 1 process vs N processes (DDP or DeepSpeed ZeRO) on the same global batch.

    python bench/shiq_processes.py                                  # embedded SmolLM2-135M, fp32, 1 vs 2 CPU processes
    (DDP)
    python bench/shiq_processes.py --accelerate_config zero2        # 1 process vs 2 under ZeRO-2
    python bench/shiq_processes.py --model some/model --bf16        # on GPUs

Both runs are ``llmq train`` on the same rows: GSM8K train questions with their reference solutions
as completions (reward 1), ``steps`` optimizer steps of ``global_batch`` rows, so that each run reads
every row exactly once and processes the same tokens.  The single process takes the whole batch, each
of the N processes ``global_batch / N``.  Throughput is those tokens over the Trainer's
``train_runtime``; memory is the peak RSS of the largest process, over the whole run and over the
training alone (before the final save, which under ZeRO-3 gathers one shard at a time).
Prints the N/1 ratios and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
from pathlib import Path


def write_rows(data_dir: Path, rows: int, folder: Path) -> tuple[Path, int]:
    """GSM8K train (question, reference solution) rows as a ShiQ dataset; returns its path and its token count."""
    from llmq.models import load_tokenizer

    examples = [json.loads(line) for line in (data_dir / "gsm8k" / "train.jsonl").read_text().splitlines()[:rows]]
    dataset = [
        {
            "prompt": [{"role": "user", "content": e["question"]}],
            "completion": [{"role": "assistant", "content": e["answer"]}],
            "reward": 1.0,
        }
        for e in examples
    ]
    path = folder / "rows.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in dataset))
    tokenizer = load_tokenizer(ARGS.model)
    texts = [tokenizer.apply_chat_template(row["prompt"] + row["completion"], tokenize=False) for row in dataset]
    tokens = sum(len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"])
    return path, tokens


def run(processes: int, dataset: Path, folder: Path) -> dict:
    output_dir = folder / f"out_{processes}"
    command = [
        sys.executable,
        "-m",
        "llmq.cli",
        "train",
        "--model_name_or_path",
        ARGS.model,
        "--dataset_path",
        str(dataset),
        "--output_dir",
        str(output_dir),
    ]
    command += [
        "--max_steps",
        str(ARGS.steps),
        "--per_device_train_batch_size",
        str(ARGS.global_batch // processes),
        "--learning_rate",
        "1e-6",
    ]
    command += [
        "--logging_steps",
        "1",
        "--save_strategy",
        "no",
        "--report_to",
        "none",
        "--seed",
        "0",
        "--max_length",
        "1024",
    ]
    command += ["--bf16", "true"] if ARGS.bf16 else []
    command += ["--gradient_checkpointing", "true"] if ARGS.gradient_checkpointing else []
    if processes > 1:
        command += ["--accelerate_config", ARGS.accelerate_config, "--num_processes", str(processes)]
    finished = subprocess.run(command, capture_output=True, text=True, check=False)
    if finished.returncode != 0:
        sys.exit(f"{processes}-process run failed:\n{finished.stderr[-3000:]}")
    metrics = json.loads((output_dir / "summary.json").read_text())["train"]
    return {
        "processes": processes,
        "train_runtime_s": metrics["train_runtime"],
        "train_loss": metrics["train_loss"],
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20,
        # The same before the final save, as the run saw it.
        "training_peak_rss_gib": metrics["peak_host_memory_gib"],
        # The share of the policy's weights one training process held after loading (1.0 unless ZeRO-3 partitions).
        "weights_held_at_load": metrics.get("weights_held_at_load", 1.0),
    }


def main() -> None:
    if ARGS.only:
        folder = Path(ARGS.workdir)
        print(json.dumps(run(ARGS.only, folder / "rows.jsonl", folder)))
        return
    import torch

    if ARGS.global_batch % ARGS.processes:
        sys.exit("--global_batch must be a multiple of --processes")
    with tempfile.TemporaryDirectory() as workdir:
        folder = Path(workdir)
        dataset, tokens = write_rows(Path(ARGS.data_dir), ARGS.steps * ARGS.global_batch, folder)
        results = {}
        for processes in (1, ARGS.processes):
            # Each run in its own benchmark process, so that the peak memory read is that run's own.
            command = [sys.executable, __file__, "--only", str(processes), "--workdir", workdir, *sys.argv[1:]]
            finished = subprocess.run(command, capture_output=True, text=True, check=False)
            if finished.returncode != 0:
                sys.exit(finished.stderr[-3000:])
            result = json.loads(finished.stdout.strip().splitlines()[-1])
            result["tokens_per_s"] = tokens / result["train_runtime_s"]
            results[processes] = result
    one, many = results[1], results[ARGS.processes]
    ratios = {
        "tokens_per_s": many["tokens_per_s"] / one["tokens_per_s"],
        "peak_rss_per_process": many["peak_rss_gib"] / one["peak_rss_gib"],
        "training_peak_rss_per_process": many["training_peak_rss_gib"] / one["training_peak_rss_gib"],
    }
    report = {
        "model": ARGS.model,
        "accelerate_config": ARGS.accelerate_config,
        "steps": ARGS.steps,
        "global_batch": ARGS.global_batch,
        "tokens": tokens,
        "device": torch.cuda.get_device_name()
        if torch.cuda.is_available()
        else f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)",
        "dtype": "bfloat16" if ARGS.bf16 else "float32",
        "gradient_checkpointing": ARGS.gradient_checkpointing,
        "results": {str(k): v for k, v in results.items()},
        f"{ARGS.processes}_over_1": ratios,
    }
    Path(ARGS.output).parent.mkdir(parents=True, exist_ok=True)
    Path(ARGS.output).write_text(json.dumps(report, indent=2) + "\n")
    print(
        f"{'processes':10}{'runtime s':>11}{'tokens/s':>10}{'peak GiB':>10}{'training':>10}   ({report['device']}, "
        f"{report['dtype']}, {ARGS.steps} steps x {ARGS.global_batch} rows, {tokens} tokens)"
    )
    for processes, result in results.items():
        print(
            f"{processes:<10}{result['train_runtime_s']:11.1f}{result['tokens_per_s']:10.1f}{result['peak_rss_gib']:10.2f}"
            f"{result['training_peak_rss_gib']:10.2f}"
        )
    print(
        f"{ARGS.processes} processes / 1 ({ARGS.accelerate_config}): tokens/s {ratios['tokens_per_s']:.3f}x, peak "
        f"memory of the largest process {ratios['peak_rss_per_process']:.3f}x, in the training alone "
        f"{ratios['training_peak_rss_per_process']:.3f}x"
    )
    print(f"report: {ARGS.output}")


parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--model", default="smollm2-135m-instruct")
parser.add_argument(
    "--accelerate_config", default="ddp", help="preset or accelerate config file of the multi-process run"
)
parser.add_argument("--processes", type=int, default=2)
parser.add_argument("--steps", type=int, default=6)
parser.add_argument("--global_batch", type=int, default=4)
parser.add_argument("--bf16", action="store_true", help="train in bf16 (GPUs)")
parser.add_argument("--gradient_checkpointing", action="store_true", help="in both runs")
parser.add_argument("--data_dir", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
parser.add_argument("--output", default="outputs/bench/shiq_processes.json")
parser.add_argument("--only", type=int, help=argparse.SUPPRESS)
parser.add_argument("--workdir", help=argparse.SUPPRESS)
ARGS = parser.parse_args()

if __name__ == "__main__":
    main()
