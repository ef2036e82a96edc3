"""Benchmark: Q-guided decoding vs plain ``generate`` on the same model, prompts and token budget.

    python bench/guided_decoding.py                                    # embedded SmolLM2-135M, fp32 on CPU
    python bench/guided_decoding.py --guide outputs/dpo_q_gsm8k_smollm2  # a trained guide
    python bench/guided_decoding.py --model random-smollm2-1.7b --guide smollm2-135m-instruct --q_model \
        --new_tokens 32 --repeats 3 --output outputs/bench/guided_decoding_q_model.json  # a 12.7x smaller Q model

The base model generates; the guided run adds a :class:`llmq.decoding.QGuidedLogitsProcessor`.  By default its
guide is a second LM of the same size (the implicit Q of a DPO or ShiQ policy: a second backbone, so about one extra
forward per token is expected).  With ``--q_model`` the guide is read as a Q model (its logits are Q/β beside the
base's, docs/algorithms.md §6.5), which may be much smaller than the base; its weights do not change the cost.  Both
runs decode the same GSM8K chat prompts greedily with ``min_new_tokens = max_new_tokens`` so they produce the same
number of tokens.  Each run is its own process so that peak memory is its own; a warm-up batch is not timed.  The
guided run also times the processor's calls and the guide's forwards inside them: what the processor costs beyond
the guide's forward, as a share of the plain run's wall time.  Prints wall time, tokens/s and peak memory with
guided/plain ratios, and writes JSON.
"""

from __future__ import annotations

import argparse
import functools
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
    timers = {"processor_s": 0.0, "guide_forward_s": 0.0}

    def timed(function, timer):
        @functools.wraps(function)  # keeps the signature, which the processor inspects for the cache's name
        def call(*arguments, **keywords):
            if cuda:
                torch.cuda.synchronize()
            started = time.perf_counter()
            result = function(*arguments, **keywords)
            if cuda:
                torch.cuda.synchronize()
            timers[timer] += time.perf_counter() - started
            return result

        return call

    if mode == "guided":
        guide = load_model(args.guide or args.model, dtype="auto", device=device).eval()
        guide.forward = timed(guide.forward, "guide_forward_s")
        processor = QGuidedLogitsProcessor(
            guide, beta=0.1, top_k=20, pad_token_id=tokenizer.pad_token_id, q_model=args.q_model
        )
        processor_call = timed(processor.__call__, "processor_s")
        processors.append(lambda input_ids, scores: processor_call(input_ids, scores))
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
        timers.update(processor_s=0.0, guide_forward_s=0.0)
        started = time.perf_counter()
        output = model.generate(**encoded, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, **options)
        if cuda:
            torch.cuda.synchronize()
        wall = time.perf_counter() - started
    generated = (output.shape[1] - encoded["input_ids"].shape[1]) * output.shape[0]
    return {
        "parameters": sum(p.numel() for p in model.parameters()),
        "guide_parameters": sum(p.numel() for p in guide.parameters()) if mode == "guided" else 0,
        **timers,
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


def run_subprocess(mode: str, args: argparse.Namespace) -> dict:
    """One run in its own process, so that its peak memory is its own."""
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
    if args.q_model:
        command.append("--q_model")
    finished = subprocess.run(command, capture_output=True, text=True, check=False)
    if finished.returncode != 0:
        sys.exit(f"{mode} run failed:\n{finished.stderr[-3000:]}")
    return json.loads(finished.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--guide", default=None, help="the guide LM (default: a second copy of --model)")
    parser.add_argument("--data_dir", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    parser.add_argument("--q_model", action="store_true", help="read the guide as a Q model (logits Q/β)")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--new_tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=1, help="runs of each mode; the median run is reported")
    parser.add_argument("--output", default="outputs/bench/guided_decoding.json")
    parser.add_argument("--only", choices=["plain", "guided"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.only:
        print(json.dumps(run_one(args.only, args)))
        return

    runs: dict[str, list[dict]] = {"plain": [], "guided": []}
    # Repeats alternate the order (plain first, then guided first) so that a drift of the machine's speed cancels.
    for repeat in range(args.repeats):
        for mode in ("plain", "guided") if repeat % 2 == 0 else ("guided", "plain"):
            runs[mode].append(run_subprocess(mode, args))
    results = {}
    for mode, mode_runs in runs.items():
        results[mode] = sorted(mode_runs, key=lambda run: run["wall_s"])[(len(mode_runs) - 1) // 2]  # the median run
        results[mode]["wall_s_of_every_run"] = [run["wall_s"] for run in mode_runs]
    plain, guided = results["plain"], results["guided"]
    ratios = {
        "wall_time": guided["wall_s"] / plain["wall_s"],
        "tokens_per_s": guided["tokens_per_s"] / plain["tokens_per_s"],
        "peak_memory": guided["peak_memory_gib"] / plain["peak_memory_gib"],
        # What guidance costs beyond the guide's own forwards, as a share of plain generation.
        "processor_overhead": (guided["processor_s"] - guided["guide_forward_s"]) / plain["wall_s"],
        "guide_forward": guided["guide_forward_s"] / plain["wall_s"],
    }
    report = {
        "model": args.model,
        "guide": args.guide or f"copy of {args.model}",
        "guide_kind": "Q model" if args.q_model else "policy",
        "model_over_guide_parameters": plain["parameters"] / guided["guide_parameters"],
        "prompts": args.prompts,
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
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
    print(
        f"guide ({report['guide_kind']}, model/guide parameters {report['model_over_guide_parameters']:.1f}x): its "
        f"forwards {ratios['guide_forward']:.1%} of plain wall time, the processor beyond them "
        f"{ratios['processor_overhead']:.1%}"
    )
    print(f"report: {args.output}")


if __name__ == "__main__":
    main()
