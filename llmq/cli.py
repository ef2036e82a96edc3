"""``llmq`` command line: train | generate | eval | explain | serve | models.

Errors in the user's input (recipe keys, files, model names) end in one line on stderr and exit
code 2, never a traceback.
"""

from __future__ import annotations

import importlib.util
import os
import shlex
import sys
from collections.abc import Sequence

import torch
from transformers.integrations import is_deepspeed_zero3_enabled

from llmq import __version__
from llmq.checkpoints import resume_point, validate_checkpoint
from llmq.config import ModelConfig, load_recipe_file, parse_recipe
from llmq.errors import UserError
from llmq.evaluation import EvalConfig, GenerateConfig, build_offline_dataset, evaluate, format_report
from llmq.explain import ExplainConfig, explain, format_summary
from llmq.launch import (
    LaunchConfig,
    gather_and_scatter_in_place_over_gloo,
    is_launched_process,
    launch_training,
    share_fp32_master_weights,
)
from llmq.methods import DEFAULT_METHOD, METHODS, method_module
from llmq.models import REGISTRY, load_from_config, prepare_model, resolve_dtype, resolve_model
from llmq.models.registry import is_prepared, model_directory
from llmq.rollout.engines import VLLMSettings
from llmq.rollout.serve import ServeConfig, serve_command

USAGE = """usage: llmq <command> [RECIPE] [--key value ...]

commands:
  train      fine-tune a model from a recipe with one method (shiq, dpo, sft, digiq, qvm): `llmq train --method NAME
  --help`
  generate   K completions per question (sampling, beam or Q-guided decoding), scored by the task's verifier, saved as
  an HF dataset
  eval       evaluate a model on a benchmark task (gsm8k, math500) with a pinned protocol
  explain    credit map of a response: per-token implicit rewards of a policy vs its reference (HTML + PNG)
  serve      start vLLM's OpenAI-compatible server for a model (for `--engine vllm_server`): `llmq serve MODEL
  [--port 8000] [-- VLLM_OPTIONS]`
  models     list the registered models, or prepare one: `llmq models list | prepare NAME`

`llmq <command> --help` documents every option of a command. A recipe is a YAML file whose keys
are those options; flags given on the command line override it.
"""


def train_config_types(method: str) -> tuple[type, ...]:
    """The dataclasses a ``llmq train`` recipe of ``method`` is parsed into: model, trainer, run, launch.
    An unknown method gets the default method's; the parser then refuses its name as a ``method`` value."""
    module = method_module(method if method in METHODS else DEFAULT_METHOD)
    return (ModelConfig, *module.config_types(method), LaunchConfig)


def _train(argv: Sequence[str]) -> int:
    # The method picks the trainer's config class, so read it before parsing everything else.
    method = (
        load_recipe_file(argv[0]).get("method", DEFAULT_METHOD)
        if argv and not argv[0].startswith("-")
        else DEFAULT_METHOD
    )
    if "--method" in argv[:-1]:
        method = argv[argv.index("--method") + 1]
    model_args, training_args, config, launch = parse_recipe(
        train_config_types(str(method)),
        argv,
        prog="llmq train",
        description="Fine-tune a model, or fit a value model, with one method (key method; `llmq train --method "
        "NAME --help` lists its keys): "
        + "; ".join(f"{name}: {entry.summary}" for name, entry in METHODS.items())
        + ". Offline methods can build their data from the initial model first (build_*) and benchmark before and "
        "after (benchmark_*); "
        "with accelerate_config / num_processes the training runs in several processes (DDP or DeepSpeed ZeRO).",
    )
    if launch.distributed and not METHODS[config.method].multi_process:
        several = ", ".join(name for name, entry in METHODS.items() if entry.multi_process)
        raise UserError(
            f"method {config.method} trains in one process; accelerate_config and num_processes apply to methods "
            f"{several}"
        )
    module = method_module(config.method)
    if not is_launched_process():  # the launching process checks the checkpoint and hands it to the training processes
        if launch.resume:
            training_args.resume_from_checkpoint = resume_point(training_args.output_dir)  # validated
            print(
                f"resuming from {training_args.resume_from_checkpoint}"
                if training_args.resume_from_checkpoint
                else f"no checkpoint in {training_args.output_dir}: the fine-tuning starts from its first step",
                flush=True,
            )
        elif (
            training_args.resume_from_checkpoint
        ):  # a damaged checkpoint fails now, not after data building, benchmarks and half a load
            validate_checkpoint(training_args.resume_from_checkpoint)
    if launch.distributed and launch.machine_rank > 0:
        # Machine 0 builds data, benchmarks and writes the summary; the others only run their training processes.
        launch_training(argv, launch, training_args.resume_from_checkpoint)
        print(f"machine {launch.machine_rank}: its training processes finished; machine 0 reports the run")
        return 0
    if is_launched_process() and is_deepspeed_zero3_enabled():  # the training arguments have set up DeepSpeed
        share_fp32_master_weights()
        gather_and_scatter_in_place_over_gloo()
    summary = module.run(model_args, training_args, config, launch, argv)
    if is_launched_process():  # the launching process reports
        # Skip the interpreter's teardown: gloo threads still finishing ZeRO-3's prefetch all-gathers
        # free Python tensors during finalization and abort the process now and then.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    print(module.describe(summary, training_args.output_dir))
    return 0


def _generate(argv: Sequence[str]) -> int:
    model_args, config = parse_recipe(
        (ModelConfig, GenerateConfig),
        argv,
        prog="llmq generate",
        description="Sample num_completions answers per question of a task (sampling, greedy, beam search, or "
        "Q-guided decoding), score them with its verifier, and save an HF dataset of (prompt, "
        "completion, reward) rows.",
    )
    model, tokenizer = _load(model_args)
    dataset = build_offline_dataset(model, tokenizer, config, model_name=model_args.model_name_or_path)
    rewards = dataset["reward"]
    print(f"{len(dataset)} completions, mean reward {sum(rewards) / len(rewards):.3f}, saved to {config.dataset_path}")
    return 0


def _load(model_args: ModelConfig) -> tuple:
    """Model (on the GPU when there is one, in eval mode) and tokenizer of a ModelConfig."""
    model, tokenizer = load_from_config(model_args, device="cuda" if torch.cuda.is_available() else None)
    model.eval()
    return model, tokenizer


def _explain(argv: Sequence[str]) -> int:
    model_args, config = parse_recipe(
        (ModelConfig, ExplainConfig),
        argv,
        prog="llmq explain",
        description="Credit map of one response: the per-token implicit reward beta*log(pi/pi_ref) of the policy "
        "(model_name_or_path) against its reference, as HTML, PNG and JSON.",
    )
    model, tokenizer = _load(model_args)
    record = explain(model, tokenizer, config, model_name=model_args.model_name_or_path, dtype=model_args.dtype)
    print(format_summary(record))
    print(f"credit map: {config.output_dir}/credit_map.html and credit_map.png")
    return 0


def _eval(argv: Sequence[str]) -> int:
    model_args, eval_args = parse_recipe(
        (ModelConfig, EvalConfig),
        argv,
        prog="llmq eval",
        description="Evaluate a model on a benchmark task: accuracy with a Wilson 95 percent interval, report.json "
        "and completions.jsonl in output_dir.",
    )
    model, tokenizer = _load(model_args)
    report = evaluate(model, tokenizer, eval_args, model_name=model_args.model_name_or_path)
    print(format_report(report))
    print(f"report: {eval_args.output_dir}/report.json")
    return 0


def _serve(argv: Sequence[str]) -> int:
    argv = list(argv)
    vllm_args = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    if argv and not argv[0].startswith("-") and not argv[0].endswith((".yaml", ".yml")):
        argv = ["--model_name_or_path", *argv]  # `llmq serve MODEL`
    config, vllm = parse_recipe(
        (ServeConfig, VLLMSettings),
        argv,
        prog="llmq serve",
        description="Start vLLM's OpenAI-compatible server (`vllm serve`) for a model, with the settings "
        "`--engine vllm_server` relies on; every other command then reaches it with `--engine vllm_server "
        "--vllm_server_url http://HOST:PORT`. Usage: llmq serve [MODEL | RECIPE] [--key value ...] [-- VLLM_OPTIONS]. "
        "The server runs in this process until it is stopped (Ctrl-C).",
    )
    if importlib.util.find_spec("vllm") is None:
        raise UserError(
            "vLLM is not installed in this environment: pip install 'llmq[vllm]' (on a CPU machine, `make install` "
            "installs vLLM's CPU build)"
        )
    cpu = not torch.cuda.is_available()
    dtype = str(resolve_dtype(config.dtype)).removeprefix("torch.")
    command, env = serve_command(
        config, vllm, resolve_model(config.model_name_or_path), dtype, cpu=cpu, vllm_args=vllm_args
    )
    print(" ".join(f"{key}={value}" for key, value in env.items()), shlex.join(command), flush=True)
    os.execve(command[0], command, {**os.environ, **env})  # the server replaces this process: signals reach it


def _models(argv: Sequence[str]) -> int:
    usage = (
        "usage: llmq models list | llmq models prepare NAME\n\n  list     registered models, whether each is "
        "prepared, and its cache directory\n  prepare  build a registered model's HF directory in the cache "
        "(the embedded model: convert its GGUF once)"
    )
    if not argv or argv[0] in ("-h", "--help"):
        print(usage)
        return 0 if argv else 2
    if argv[0] == "list" and len(argv) == 1:
        for name, entry in REGISTRY.items():
            state = "prepared" if is_prepared(name) else "not prepared"
            print(f"{name:24} {state:13} {entry.description}\n{'':24} {model_directory(name)}")
        return 0
    if argv[0] == "prepare" and len(argv) == 2:
        print(prepare_model(argv[1]))
        return 0
    raise UserError(f"models: expected 'list' or 'prepare NAME', got {' '.join(argv)!r}")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    if argv[0] == "--version":
        print(f"llmq {__version__}")
        return 0
    command, rest = argv[0], argv[1:]
    commands = {
        "train": _train,
        "generate": _generate,
        "eval": _eval,
        "explain": _explain,
        "serve": _serve,
        "models": _models,
    }
    try:
        if command not in commands:
            raise UserError(f"unknown command '{command}'; choose one of {', '.join(commands)}")
        return commands[command](rest)
    except UserError as error:
        print(f"llmq {command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"llmq {command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
