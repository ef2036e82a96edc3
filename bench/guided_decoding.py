"""Benchmark: Q-guided decoding vs plain ``generate`` on the same model, prompts and token budget.

    python bench/guided_decoding.py                                    # embedded SmolLM2-135M, fp32 on CPU
    python bench/guided_decoding.py --guide outputs/dpo_q_gsm8k_smollm2  # a trained guide

The base model generates; the guided run adds a :class:`llmq.decoding.QGuidedLogitsProcessor`
whose guide is a second LM of the same size (the implicit Q of a DPO or ShiQ policy: a second
backbone, so about one extra forward per token is expected).  Both runs decode the same GSM8K
chat prompts greedily with ``min_new_tokens = max_new_tokens`` so they produce the same number of
tokens.  Each run is its own process so that peak memory is its own; a warm-up batch is not timed.
Prints wall time, tokens/s and peak memory with guided/plain ratios, and writes JSON.
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


def run_one(mode: str, args: argparse.Namespace) -> dict:
    import torch
    from transformers import LogitsProcessorList

    from llmq.decoding import QGuidedLogitsProcessor
    from llmq.models import load_model, load_tokenizer

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    tokenizer = load_tokenizer(args.model)
    tokenizer.padding_side = "left"
    model = load_model(args.model, dtype="auto", device=device).eval()
    processors = LogitsProcessorList()
    if mode == "guided":
        guide = load_model(args.guide or args.model, dtype="auto", device=device).eval()
        processors.append(QGuidedLogitsProcessor(guide, beta=0.1, top_k=20, pad_token_id=tokenizer.pad_token_id))
    rows = [
        json.loads(line)
        for line in (Path(args.data_dir) / "gsm8k" / "test.jsonl").read_text().splitlines()[: args.prompts]
    ]
    texts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": row["question"]}], tokenize=False, add_generation_prompt=True
        )
        for row in rows
    ]
    encoded = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
    options = dict(
        do_sample=False,
        temperature=None,
        top_p=None,
        top_k=None,
        pad_token_id=tokenizer.pad_token_id,
        logits_processor=processors,
    )

    with torch.no_grad():
        model.generate(**encoded, max_new_tokens=4, min_new_tokens=4, **options)  # warm-up
        if cuda:
            torch.cuda.synchronize()
        started = time.perf_counter()
        output = model.generate(**encoded, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, **options)
        if cuda:
            torch.cuda.synchronize()
        wall = time.perf_counter() - started
    generated = (output.shape[1] - encoded["input_ids"].shape[1]) * output.shape[0]
    return {
        "wall_s": wall,
        "tokens": generated,
        "tokens_per_s": generated / wall,
        "peak_memory_gib": (
            torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        )
        / 2**30,
        "memory_kind": "cuda max_memory_allocated" if cuda else "process peak RSS",
        "device": torch.cuda.get_device_name() if cuda else platform.processor() or "cpu",
        "dtype": str(model.dtype),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--guide", default=None, help="the guide LM (default: a second copy of --model)")
    parser.add_argument("--data_dir", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--new_tokens", type=int, default=128)
    parser.add_argument("--output", default="outputs/bench/guided_decoding.json")
    parser.add_argument("--only", choices=["plain", "guided"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.only:
        print(json.dumps(run_one(args.only, args)))
        return

    results = {}
    for mode in ("plain", "guided"):
        command = [
            sys.executable,
            __file__,
            "--only",
            mode,
            "--model",
            args.model,
            "--data_dir",
            args.data_dir,
            "--prompts",
            str(args.prompts),
            "--new_tokens",
            str(args.new_tokens),
        ]
        if args.guide:
            command += ["--guide", args.guide]
        finished = subprocess.run(command, capture_output=True, text=True, check=False)
        if finished.returncode != 0:
            sys.exit(f"{mode} run failed:\n{finished.stderr[-3000:]}")
        results[mode] = json.loads(finished.stdout.strip().splitlines()[-1])
    plain, guided = results["plain"], results["guided"]
    ratios = {
        "wall_time": guided["wall_s"] / plain["wall_s"],
        "tokens_per_s": guided["tokens_per_s"] / plain["tokens_per_s"],
        "peak_memory": guided["peak_memory_gib"] / plain["peak_memory_gib"],
    }
    report = {
        "model": args.model,
        "guide": args.guide or f"copy of {args.model}",
        "prompts": args.prompts,
        "new_tokens": args.new_tokens,
        "results": results,
        "guided_over_plain": ratios,
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(report, indent=2) + "\n")
    print(
        f"{'':8}{'wall s':>9}{'tokens/s':>10}{'peak GiB':>10}   ({plain['device']}, {plain['dtype']}, "
        f"{args.prompts} prompts x {args.new_tokens} tokens, greedy)"
    )
    for name, result in results.items():
        print(f"{name:8}{result['wall_s']:9.2f}{result['tokens_per_s']:10.1f}{result['peak_memory_gib']:10.2f}")
    print(
        f"{'guided/plain':12} wall time {ratios['wall_time']:.3f}x, tokens/s {ratios['tokens_per_s']:.3f}x, peak "
        f"memory {ratios['peak_memory']:.3f}x"
    )
    print(f"report: {args.output}")


if __name__ == "__main__":
    main()
