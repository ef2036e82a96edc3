"""Benchmark: what Digi-Q on screens costs with SmolVLM-256M's architecture, and the recipe's expected time.

    python bench/digiq_screens_cost.py                                  # random SmolVLM-256M, fp32 on the CPU
    python bench/digiq_screens_cost.py --device cuda --dtype bfloat16   # the GPU recipe's setting

``recipes/digiq/textworld_screens_smolvlm.yaml`` runs HuggingFaceTB/SmolVLM-256M-Instruct, which a machine without
the Hub cannot load; ``random-smolvlm-256m`` has its architecture, size and image tiling (a 448×336 screen becomes
12 tiles of 512×512 plus the whole image: 13 × 64 image tokens) with random weights, which cost the same.  On states
of the recipe's games logged by a text run (``--text_run``: the same 40 train and 20 test games, 8 steps), it times

- scoring a state's admissible commands beside its screen as the pipeline does (``command_logprobs`` with
  ``screens``: the prompt and screen read once, their KV cache serving every command), against one full forward pass
  per command (prompt + command with the screen, ``extract_features``: what the pipeline ran before);
- the processor alone (image splitting and tokenization, on the CPU whatever the device);
- one actor update: forward, backward and AdamW on policy examples with their screens (``--actor_batch`` of them,
  the time scaled to the recipe's ``per_device_train_batch_size``);

counts one forward's FLOPs (``torch.utils.flop_counter``), and multiplies the costs by the recipe's stage sizes,
counted from the text run's data: every logged step's commands scored in collection, every distinct state's commands
read for the critic's features, the test games played before and after training, and the actor's steps.  Prints the
expected time with both ways of scoring, peak memory, and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import time
from pathlib import Path

import torch


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="random-smolvlm-256m")
    parser.add_argument("--recipe", type=Path, default=Path("recipes/digiq/textworld_screens_smolvlm.yaml"))
    parser.add_argument(
        "--text_run",
        type=Path,
        default=Path("outputs/digiq_textworld_smollm2"),
        help="a finished run of recipes/digiq/textworld_smollm2.yaml (its trajectories and summary give the counts)",
    )
    parser.add_argument("--states", type=int, default=2, help="logged states timed (their commands all scored)")
    parser.add_argument("--batch_size", type=int, default=8, help="commands per forward pass (the pipeline's 8)")
    parser.add_argument(
        "--actor_batch", type=int, help="rows of the timed actor step (default the recipe's); the time scales to it"
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--output", type=Path, default=Path("outputs/bench/digiq_screens_cost.json"))
    return parser


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def peak_memory_gib(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def main(argv: list[str] | None = None) -> int:
    import datasets
    from torch.utils.flop_counter import FlopCounterMode

    from llmq.config import load_recipe_file
    from llmq.envs.textworld import command_logprobs, policy_example, policy_prompt, screen_image
    from llmq.models import load_model, load_tokenizer
    from llmq.models.features import extract_features

    args = make_parser().parse_args(argv)
    trajectories, summary_file = args.text_run / "trajectories", args.text_run / "summary.json"
    if not trajectories.is_dir() or not summary_file.is_file():
        print(
            f"error: --text_run {args.text_run} has no trajectories/ and summary.json of a finished run",
            file=sys.stderr,
        )
        return 2
    data = datasets.load_from_disk(str(trajectories))
    text_summary = json.loads(summary_file.read_text())
    recipe = load_recipe_file(args.recipe)

    processor = load_tokenizer(args.model)
    model = load_model(args.model, dtype=args.dtype, device=args.device).eval()
    rows = [data[i] for i in range(args.states)]
    states, admissible = [r["state"] for r in rows], [r["admissible"] for r in rows]
    commands_timed = sum(len(c) for c in admissible)
    prompts = [
        processor.apply_chat_template(policy_prompt(s, c, screens=True), tokenize=False, add_generation_prompt=True)
        for s, c in zip(states, admissible)
    ]
    end = processor.tokenizer.eos_token
    images = [screen_image(s) for s in states]

    start = time.perf_counter()
    encoded = [processor(text=[p], images=[i], return_tensors="pt") for p, i in zip(prompts, images)]
    processor_s = (time.perf_counter() - start) / len(states)
    prompt_tokens = sum(e["input_ids"].shape[1] for e in encoded) / len(states)
    tiles = encoded[0]["pixel_values"].shape[1]

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(**encoded[0].to(args.device))
    forward_flops = counter.get_total_flops()

    synchronize(args.device)
    start = time.perf_counter()
    command_logprobs(model, processor, states, admissible, batch_size=args.batch_size, screens=True)
    synchronize(args.device)
    cached_s = (time.perf_counter() - start) / len(states)

    texts = [p + c + end for p, cs in zip(prompts, admissible) for c in cs]
    pair_images = [i for i, cs in zip(images, admissible) for _ in cs]
    synchronize(args.device)
    start = time.perf_counter()
    extract_features(model, processor, texts, images=pair_images, batch_size=args.batch_size, progress=False)
    synchronize(args.device)
    full_s = (time.perf_counter() - start) / len(states)

    scoring_peak_gib = peak_memory_gib(args.device)
    batch = recipe["per_device_train_batch_size"]
    actor_batch = args.actor_batch or batch
    examples = [policy_example(r["state"], r["admissible"], r["action"], screens=True) for r in rows[:1] * actor_batch]
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe["learning_rate"])
    inputs = processor(
        text=[processor.apply_chat_template(e["prompt"] + e["completion"], tokenize=False) for e in examples],
        images=[e["images"] for e in examples],
        padding=True,
        return_tensors="pt",
    ).to(args.device)
    synchronize(args.device)
    start = time.perf_counter()
    loss = model(**inputs, labels=inputs["input_ids"]).loss
    loss.backward()
    optimizer.step()
    synchronize(args.device)
    actor_step_s = (time.perf_counter() - start) * batch / actor_batch  # a step of the recipe's batch

    # The recipe's stage sizes, counted on the text run of the same games (the screens change no game).
    logged_steps = len(data)
    distinct_states = len({*data["state"], *data["next_state"]})
    commands_per_step = sum(len(c) for c in data["admissible"]) / logged_steps
    steps_per_game = text_summary["before"]["steps_mean"] + text_summary["after"]["steps_mean"]
    evaluated_states = round(recipe["test_games"] * steps_per_game)
    actor_steps = int(text_summary["extraction"]["kept"]) // batch * recipe["num_train_epochs"]
    scored_states = logged_steps + distinct_states + evaluated_states
    expected = {
        "states_scored_with_their_commands": scored_states,
        "actor_steps": actor_steps,
        "cached_prompt_h": (scored_states * cached_s + actor_steps * actor_step_s) / 3600,
        "one_pass_per_command_h": (scored_states * full_s + actor_steps * actor_step_s) / 3600,
        "processor_h": (scored_states + actor_steps * batch) * processor_s / 3600,
    }
    result = {
        "model": args.model,
        "device": args.device,
        "dtype": args.dtype,
        "machine": platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "states_timed": args.states,
        "commands_timed": commands_timed,
        "screen_tiles": tiles,
        "prompt_tokens_mean": prompt_tokens,
        "forward_tflops": forward_flops / 1e12,
        "processor_s_per_state": processor_s,
        "cached_prompt_s_per_state": cached_s,
        "one_pass_per_command_s_per_state": full_s,
        "speedup": full_s / cached_s,
        "actor_batch_timed": actor_batch,
        "actor_step_s": actor_step_s,
        "peak_memory_scoring_gib": scoring_peak_gib,
        "peak_memory_gib": peak_memory_gib(args.device),
        "counts": {
            "logged_steps": logged_steps,
            "distinct_states": distinct_states,
            "commands_per_step": commands_per_step,
            "evaluated_states": evaluated_states,
        },
        "expected": expected,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2))
    print(
        f"{args.model} on {args.device} ({args.dtype}): a screen is {tiles} tiles, "
        f"prompts {prompt_tokens:.0f} tokens, "
        f"one forward {forward_flops / 1e12:.2f} TFLOP\n"
        f"per state ({commands_timed / args.states:.1f} commands): cached prompt {cached_s:.1f} s, one pass per "
        f"command {full_s:.1f} s ({full_s / cached_s:.2f}x), processor {processor_s:.2f} s; "
        f"actor step of {batch}: {actor_step_s:.1f} s; peak memory {scoring_peak_gib:.2f} GiB scoring, "
        f"{result['peak_memory_gib']:.2f} GiB with the actor step\n"
        f"expected for the recipe ({scored_states} states scored, {actor_steps} actor steps): "
        f"{expected['cached_prompt_h']:.1f} h (one pass per command: {expected['one_pass_per_command_h']:.1f} h), "
        f"of which the processor {expected['processor_h']:.2f} h\n-> {args.output}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
