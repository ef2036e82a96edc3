"""Benchmark: one online ShiQ update vs one TRL GRPO update on the same sampled answers.

    python bench/update_throughput.py               # the embedded SmolLM2-135M, fp32 on CPU
    python bench/update_throughput.py --steps 20    # more steps

The parent samples 4 answers to each of 2 products_3x1digit questions with the initial model (the
rows an online round trains on) and hands the same tokens to two child processes, so that peak
memory is each update's own:

* shiq: :class:`llmq.trainers.online.OnlineTrainer`'s update: reference statistics computed once when
  the rows enter the buffer (not timed, as in a run), then forward, ShiQ loss, backward, AdamW step;
* grpo: TRL's ``GRPOTrainer.compute_loss`` on the same prompts and answers (group-normalised
  advantages from the verifier, TRL's defaults: no KL term), backward, AdamW step.

Prints training tokens per second (prompt and answer tokens of the batch) with the ShiQ/GRPO ratio,
and each process's peak memory; writes JSON.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODEL = "smollm2-135m-instruct"


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10, help="timed updates (after one untimed warm-up)")
    parser.add_argument("--output", type=Path, default=Path("outputs/bench/update_throughput.json"))
    parser.add_argument("--child", choices=["shiq", "grpo"], help=argparse.SUPPRESS)
    parser.add_argument("--samples", type=Path, help="the sampled answers (JSON): reused when the file exists")
    return parser


def sample(path: Path) -> None:
    """4 answers to each of 2 train questions from the initial model, as token ids with their rewards."""
    from llmq.data.tasks import load_task, load_task_rows, task_scorer
    from llmq.methods.online import task_prompts
    from llmq.models import load_model, load_tokenizer
    from llmq.rollout.base import SamplingParams
    from llmq.rollout.hf import HFEngine
    from llmq.rollout.vllm import encode

    model, tokenizer = load_model(MODEL, dtype="float32"), load_tokenizer(MODEL)
    task = load_task("products_3x1digit")
    questions = load_task_rows(task, "train")[:2]
    prompts = task_prompts(task, questions)
    outputs = HFEngine(model, tokenizer, progress=False).generate(
        prompts, n=4, sampling=SamplingParams(max_new_tokens=64, temperature=0.8, seed=0)
    )
    score = task_scorer(task)
    rows = []
    for question, prompt, group in zip(questions, prompts, outputs):
        prompt_ids = encode(tokenizer, prompt)
        for completion in group:
            reward = float(score(completion.text, question["answer"]).correct)
            rows.append({"prompt_ids": prompt_ids, "completion_ids": completion.token_ids, "reward": reward})
    path.write_text(json.dumps(rows))


def time_updates(update, steps: int) -> float:
    update()  # warm-up: allocations, the optimizer's state
    started = time.perf_counter()
    for _ in range(steps):
        update()
    return time.perf_counter() - started


def shiq_child(rows: list[dict], steps: int) -> dict:
    from llmq.data.trajectories import sampled_trajectory
    from llmq.models import load_model
    from llmq.trainers.online import OnlineConfig, OnlineTrainer

    args = OnlineConfig(
        output_dir=tempfile.mkdtemp(), use_cpu=True, report_to="none", per_device_train_batch_size=len(rows)
    )
    trainer = OnlineTrainer(load_model(MODEL, dtype="float32"), args, rollout=None, pad_token_id=2)
    batch = trainer._with_reference_statistics(
        [
            sampled_trajectory(r["prompt_ids"], r["completion_ids"], r["reward"], False, 1024, i)
            for i, r in enumerate(rows)
        ]
    )
    tokens = sum(len(row["input_ids"]) for row in batch)
    trainer.model.train()

    def update():
        loss, _ = trainer._loss(batch)
        trainer.accelerator.backward(loss)
        trainer.optimizer.step()
        trainer.optimizer.zero_grad()

    return {"tokens_per_step": tokens, "seconds": time_updates(update, steps)}


def grpo_child(rows: list[dict], steps: int) -> dict:
    import datasets
    import torch
    from trl import GRPOTrainer

    from llmq.models import load_model, load_tokenizer
    from llmq.trainers.trl_configs import GRPOConfig

    tokenizer = load_tokenizer(MODEL)
    args = GRPOConfig(
        output_dir=tempfile.mkdtemp(),
        use_cpu=True,
        report_to="none",
        per_device_train_batch_size=len(rows),
        num_generations=4,
        learning_rate=5e-5,
    )
    trainer = GRPOTrainer(
        model=load_model(MODEL, dtype="float32"),
        reward_funcs=lambda completions, **kwargs: [0.0] * len(completions),
        args=args,
        train_dataset=datasets.Dataset.from_dict({"prompt": ["unused"] * 8}),
        processing_class=tokenizer,
    )
    pad = tokenizer.pad_token_id
    width_prompt = max(len(r["prompt_ids"]) for r in rows)
    width_answer = max(len(r["completion_ids"]) for r in rows)
    prompt_ids = torch.tensor([[pad] * (width_prompt - len(r["prompt_ids"])) + r["prompt_ids"] for r in rows])
    completion_ids = torch.tensor(
        [r["completion_ids"] + [pad] * (width_answer - len(r["completion_ids"])) for r in rows]
    )
    completion_mask = torch.tensor(
        [[1] * len(r["completion_ids"]) + [0] * (width_answer - len(r["completion_ids"])) for r in rows]
    )
    rewards = torch.tensor([r["reward"] for r in rows]).view(-1, 4)
    advantages = ((rewards - rewards.mean(1, keepdim=True)) / (rewards.std(1, keepdim=True) + 1e-4)).view(-1)
    inputs = {
        "prompt_ids": prompt_ids,
        "prompt_mask": (prompt_ids != pad).long(),
        "completion_ids": completion_ids,
        "completion_mask": completion_mask,
        "advantages": advantages,
        "num_items_in_batch": completion_mask.sum(),
    }
    trainer.current_gradient_accumulation_steps = 1  # set by the Trainer's own loop, which this bypasses
    optimizer = torch.optim.AdamW(trainer.model.parameters(), lr=args.learning_rate)
    trainer.model.train()

    def update():
        loss = trainer.compute_loss(trainer.model, inputs)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    tokens = int(inputs["prompt_mask"].sum() + completion_mask.sum())
    return {"tokens_per_step": tokens, "seconds": time_updates(update, steps)}


def main() -> None:
    args = make_parser().parse_args()
    if args.child:
        rows = json.loads(args.samples.read_text())
        result = (shiq_child if args.child == "shiq" else grpo_child)(rows, args.steps)
        result["peak_memory_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps(result))
        return
    samples = args.samples or Path(tempfile.mkdtemp()) / "samples.json"
    if not samples.is_file():
        sample(samples)
    results = {}
    for method in ("shiq", "grpo"):
        command = [sys.executable, __file__, "--child", method, "--samples", str(samples), "--steps", str(args.steps)]
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        result = json.loads(output.strip().splitlines()[-1])
        result["tokens_per_s"] = result["tokens_per_step"] * args.steps / result["seconds"]
        results[method] = result
        print(
            f"{method}: {result['tokens_per_s']:.0f} training tokens/s ({result['tokens_per_step']} tokens a step), "
            f"peak memory {result['peak_memory_mb']:.0f} MB",
            flush=True,
        )
    results["shiq_over_grpo_tokens_per_s"] = results["shiq"]["tokens_per_s"] / results["grpo"]["tokens_per_s"]
    print(f"ShiQ / GRPO training tokens per second: {results['shiq_over_grpo_tokens_per_s']:.2f}")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2) + "\n")
    print(f"results: {args.output}")


if __name__ == "__main__":
    main()
