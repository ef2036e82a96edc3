"""Benchmark: ShiQTrainer vs TRL's DPOTrainer on the same model, sequences and number of steps.

    python bench/shiq_vs_dpo.py                       # embedded SmolLM2-135M, fp32 on CPU
    python bench/shiq_vs_dpo.py --steps 20 --pairs 4  # on a GPU: bf16 automatically
    python bench/shiq_vs_dpo.py --model random-qwen2.5-0.5b --pairs 8 --steps 12  # bench/gpu_check.sh's run

Each step of either trainer sees the same 2·P sequences (P preference pairs for DPO; the same
texts as 2·P rewarded completions for ShiQ), runs the policy forward + backward and a live
reference forward.  Each trainer runs in its own process so that peak memory is its own.
Prints steps/s, tokens/s and peak memory with ShiQ/DPO ratios, and writes JSON.  On a GPU whose dense bf16 peak is
known (H100, H200, A100) or given (``--peak_tflops``) it also prints the model FLOPs utilisation, 6·N·tokens/s over
that peak: the policy's forward and backward (the reference's forward is not counted, as usual).
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

# Dense bf16 peaks from the vendors' data sheets (TFLOP/s), for MFU.
DENSE_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0}


def gsm8k_texts(data_dir: Path, pairs: int) -> list[dict]:
    rows = [json.loads(line) for line in (data_dir / "gsm8k" / "train.jsonl").read_text().splitlines()[: 2 * pairs]]
    # chosen = the question's reference solution, rejected = another question's (a similar length).
    return [
        {
            "prompt": f"Question: {rows[i]['question']}\nAnswer:",
            "chosen": " " + rows[i]["answer"],
            "rejected": " " + rows[i + pairs]["answer"],
        }
        for i in range(pairs)
    ]


def run_one(method: str, args: argparse.Namespace) -> dict:
    import datasets
    import torch
    from transformers import TrainerCallback

    from llmq.models import load_model, load_tokenizer

    cuda = torch.cuda.is_available()
    pairs = gsm8k_texts(Path(args.data_dir), args.pairs)
    tokenizer = load_tokenizer(args.model)
    model = load_model(args.model, dtype="auto")
    common = dict(
        output_dir=f"/tmp/llmq-bench-{method}",
        max_steps=args.steps,
        per_device_train_batch_size=args.pairs if method == "dpo" else 2 * args.pairs,
        learning_rate=1e-6,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        gradient_checkpointing=False,
        bf16=cuda,
        use_cpu=not cuda,
        seed=0,
        max_length=1024,
    )
    if method == "dpo":
        from trl import DPOConfig, DPOTrainer

        dataset = datasets.Dataset.from_list(pairs)
        trainer = DPOTrainer(
            model=model, args=DPOConfig(beta=0.1, **common), train_dataset=dataset, processing_class=tokenizer
        )
    else:
        from llmq.trainers import ShiQConfig, ShiQTrainer

        rows = [
            {"prompt": p["prompt"], "completion": p[key], "reward": float(key == "chosen")}
            for p in pairs
            for key in ("chosen", "rejected")
        ]
        trainer = ShiQTrainer(
            model=model,
            args=ShiQConfig(beta=0.1, **common),
            train_dataset=datasets.Dataset.from_list(rows),
            processing_class=tokenizer,
        )

    step_times: list[float] = []
    tokens: list[int] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, *_, **__):
            if cuda:
                torch.cuda.synchronize()
            step_times.append(time.perf_counter())

    trainer.add_callback(Timer())
    # Count the real (non-padding) tokens that every step feeds to the policy.
    original = trainer.data_collator

    def counting(rows):
        batch = original(rows)
        mask = [v for k, v in batch.items() if k.endswith("attention_mask")]
        tokens.append(int(sum(m.sum() for m in mask)))
        return batch

    trainer.data_collator = counting
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    trainer.train()
    if cuda:
        torch.cuda.synchronize()
    step_times.append(time.perf_counter())
    durations = [b - a for a, b in zip(step_times, step_times[1:])][1:]  # the first step warms up
    per_step = sum(durations) / len(durations)
    parameters = sum(p.numel() for p in model.parameters())
    tokens_per_s = sum(tokens[1:]) / max(1, len(tokens) - 1) / per_step
    device = torch.cuda.get_device_name() if cuda else platform.processor() or "cpu"
    peak_tflops = args.peak_tflops or next((peak for name, peak in DENSE_BF16_TFLOPS.items() if name in device), None)
    return {
        "method": method,
        "parameters": parameters,
        "model_tflops": 6 * parameters * tokens_per_s / 1e12,
        "mfu": 6 * parameters * tokens_per_s / (peak_tflops * 1e12) if cuda and peak_tflops else None,
        "steps": args.steps,
        "sequences_per_step": 2 * args.pairs,
        "tokens_per_step": sum(tokens[1:]) / max(1, len(tokens) - 1),
        "seconds_per_step": per_step,
        "steps_per_s": 1 / per_step,
        "tokens_per_s": tokens_per_s,
        "peak_memory_gib": (
            torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        )
        / 2**30,
        "memory_kind": "cuda max_memory_allocated" if cuda else "process peak RSS",
        "wall_s": time.perf_counter() - started,
        "device": device,
        "dtype": "bfloat16 autocast" if cuda else str(model.dtype),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--data_dir", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    parser.add_argument(
        "--pairs", type=int, default=2, help="preference pairs per step (ShiQ sees 2x this many sequences)"
    )
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--peak_tflops", type=float, help="the GPU's dense bf16 peak, for MFU (default: known GPUs)")
    parser.add_argument("--output", default="outputs/bench/shiq_vs_dpo.json")
    parser.add_argument("--only", choices=["shiq", "dpo"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.only:
        print(json.dumps(run_one(args.only, args)))
        return

    results = {}
    for method in ("shiq", "dpo"):
        command = [
            sys.executable,
            __file__,
            "--only",
            method,
            "--model",
            args.model,
            "--data_dir",
            args.data_dir,
            "--pairs",
            str(args.pairs),
            "--steps",
            str(args.steps),
        ]
        command += ["--peak_tflops", str(args.peak_tflops)] if args.peak_tflops else []
        finished = subprocess.run(command, capture_output=True, text=True, check=False)
        if finished.returncode != 0:
            sys.exit(f"{method} run failed:\n{finished.stderr[-3000:]}")
        results[method] = json.loads(finished.stdout.strip().splitlines()[-1])
    shiq, dpo = results["shiq"], results["dpo"]
    ratios = {key: shiq[key] / dpo[key] for key in ("steps_per_s", "tokens_per_s", "peak_memory_gib")}
    report = {"model": args.model, "pairs_per_step": args.pairs, "results": results, "shiq_over_dpo": ratios}
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(report, indent=2) + "\n")
    print(
        f"{'':8}{'steps/s':>10}{'tokens/s':>11}{'peak GiB':>10}   ({shiq['device']}, {shiq['dtype']}, "
        f"{2 * args.pairs} sequences/step)"
    )
    for name, result in results.items():
        print(f"{name:8}{result['steps_per_s']:10.3f}{result['tokens_per_s']:11.1f}{result['peak_memory_gib']:10.2f}")
    print(
        f"{'ShiQ/DPO':8}{ratios['steps_per_s']:10.3f}{ratios['tokens_per_s']:11.3f}{ratios['peak_memory_gib']:10.3f}"
    )
    for name, result in results.items():
        mfu = f", MFU {result['mfu']:.1%}" if result["mfu"] is not None else ""
        print(f"{name}: {result['model_tflops']:.2f} model TFLOP/s (6·N·tokens/s, N = {result['parameters']:,}){mfu}")
    print(f"report: {args.output}")


if __name__ == "__main__":
    main()
