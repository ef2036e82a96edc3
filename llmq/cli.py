"""``llmq`` command line: train | generate | eval | explain | models.

Errors in the user's input (recipe keys, files, model names) end in one line on stderr and exit
code 2, never a traceback.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from llmq import __version__
from llmq.errors import UserError
from llmq.launch import LaunchConfig, is_launched_process

USAGE = """usage: llmq <command> [RECIPE] [--key value ...]

commands:
  train      fine-tune a model from a recipe (ShiQ, DPO, or SFT on best-of-N samples), with optional data building and before/after benchmark
  generate   K completions per question (sampling, beam or Q-guided decoding), scored by the task's verifier, saved as an HF dataset
  eval       evaluate a model on a benchmark task (gsm8k, math500) with a pinned protocol
  explain    credit map of a response: per-token implicit rewards of a policy vs its reference (HTML + PNG)
  models     list the registered models, or prepare one: `llmq models list | prepare NAME`

`llmq <command> --help` documents every option of a command. A recipe is a YAML file whose keys
are those options; flags given on the command line override it.
"""



def train_config_types(method: str) -> tuple[type, ...]:
    """The dataclasses a ``llmq train`` recipe of ``method`` is parsed into (model, trainer, run)."""
    from llmq.pipeline import TrainRunConfig
    from llmq.recipes import ModelConfig
    from llmq.trainers import DPOConfig, SFTConfig, ShiQConfig

    if method == "digiq":  # games and a critic instead of a dataset; the actor trains with SFT arguments
        from llmq.digiq import DigiQRunConfig

        return ModelConfig, SFTConfig, DigiQRunConfig, LaunchConfig
    if method == "qvm":  # a value head for Q* search; the policy is not trained
        from transformers import TrainingArguments

        from llmq.qvm import QVMRunConfig

        return ModelConfig, TrainingArguments, QVMRunConfig, LaunchConfig
    # An unknown method is reported by the parser, against TrainRunConfig's choices.
    return ModelConfig, {"dpo": DPOConfig, "sft": SFTConfig}.get(method, ShiQConfig), TrainRunConfig, LaunchConfig


def _train(argv: Sequence[str]) -> int:
    from llmq.recipes import load_recipe_file, parse_recipe

    # The method picks the trainer's config class, so read it before parsing everything else.
    method = load_recipe_file(argv[0]).get("method", "shiq") if argv and not argv[0].startswith("-") else "shiq"
    if "--method" in argv[:-1]:
        method = argv[argv.index("--method") + 1]
    model_args, training_args, run, launch = parse_recipe(
        train_config_types(method),
        argv,
        prog="llmq train",
        description="Fine-tune with ShiQ (method: shiq), DPO (method: dpo), SFT on best-of-N extractions (method: sft), Digi-Q on TextWorld games "
        "(method: digiq), or a Q-value model for Q* search (method: qvm): optionally build offline data from the initial model (build_*), benchmark before and after (benchmark_*), save to output_dir. "
        "With accelerate_config / num_processes the training runs in several processes (DDP or DeepSpeed ZeRO).",
    )
    if launch.distributed and method in ("digiq", "qvm"):
        raise UserError(f"method {method} trains in one process; accelerate_config and num_processes apply to methods shiq, dpo and sft")
    if not is_launched_process():  # the launching process checks the checkpoint and hands it to the training processes
        from llmq.checkpoints import resume_point, validate_checkpoint

        if launch.resume:
            training_args.resume_from_checkpoint = resume_point(training_args.output_dir)  # validated
            print(f"resuming from {training_args.resume_from_checkpoint}" if training_args.resume_from_checkpoint else f"no checkpoint in {training_args.output_dir}: the fine-tuning starts from its first step", flush=True)
        elif training_args.resume_from_checkpoint:  # a damaged checkpoint fails now, not after data building, benchmarks and half a load
            validate_checkpoint(training_args.resume_from_checkpoint)
    if method == "qvm":
        from llmq.qvm import run_qvm

        summary = run_qvm(model_args, training_args, run)
        print(f"QVM on {summary['steps']} labelled steps (mean label {summary['rollout_label_mean']:.3f}) saved to {training_args.output_dir}")
        return 0
    if method == "digiq":
        from llmq.digiq import run_digiq

        summary = run_digiq(model_args, training_args, run, resume=launch.resume)
        before, after = summary["before"]["success_rate"], summary["after"]["success_rate"]
        print(f"success on test games {100 * before:.1f}% → {100 * after:.1f}%; model saved to {training_args.output_dir}; summary: {training_args.output_dir}/summary.json")
        return 0
    from llmq.pipeline import run_training

    summary = run_training(model_args, training_args, run, launch, argv)
    if is_launched_process():  # the launching process reports
        # Skip the interpreter's teardown: gloo threads still finishing ZeRO-3's prefetch all-gathers
        # free Python tensors during finalization and abort the process now and then.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    print(f"model saved to {training_args.output_dir}; summary: {training_args.output_dir}/summary.json (train loss {summary['train'].get('train_loss', float('nan')):.4f})")
    return 0


def _generate(argv: Sequence[str]) -> int:
    from llmq.data.offline import GenerateConfig, build_offline_dataset
    from llmq.recipes import ModelConfig, parse_recipe

    model_args, config = parse_recipe(
        (ModelConfig, GenerateConfig),
        argv,
        prog="llmq generate",
        description="Sample num_completions answers per question of a task (sampling, greedy, beam search, or Q-guided decoding), score them with its verifier, and save an HF dataset of (prompt, completion, reward) rows.",
    )
    model, tokenizer = _load(model_args)
    dataset = build_offline_dataset(model, tokenizer, config, model_name=model_args.model_name_or_path)
    rewards = dataset["reward"]
    print(f"{len(dataset)} completions, mean reward {sum(rewards) / len(rewards):.3f}, saved to {config.dataset_path}")
    return 0


def _load(model_args):
    """Model (on the GPU when there is one, in eval mode) and tokenizer of a ModelConfig."""
    import torch

    from llmq.models import load_from_config

    model, tokenizer = load_from_config(model_args, device="cuda" if torch.cuda.is_available() else None)
    model.eval()
    return model, tokenizer


def _explain(argv: Sequence[str]) -> int:
    from llmq.explain import ExplainConfig, explain, format_summary
    from llmq.recipes import ModelConfig, parse_recipe

    model_args, config = parse_recipe(
        (ModelConfig, ExplainConfig),
        argv,
        prog="llmq explain",
        description="Credit map of one response: the per-token implicit reward beta*log(pi/pi_ref) of the policy (model_name_or_path) against its reference, as HTML, PNG and JSON.",
    )
    model, tokenizer = _load(model_args)
    record = explain(model, tokenizer, config, model_name=model_args.model_name_or_path, dtype=model_args.dtype)
    print(format_summary(record))
    print(f"credit map: {config.output_dir}/credit_map.html and credit_map.png")
    return 0


def _eval(argv: Sequence[str]) -> int:
    from llmq.evaluation.run import EvalConfig, evaluate, format_report
    from llmq.recipes import ModelConfig, parse_recipe

    model_args, eval_args = parse_recipe(
        (ModelConfig, EvalConfig),
        argv,
        prog="llmq eval",
        description="Evaluate a model on a benchmark task: accuracy with a bootstrap 95 percent interval, report.json and completions.jsonl in output_dir.",
    )
    model, tokenizer = _load(model_args)
    report = evaluate(model, tokenizer, eval_args, model_name=model_args.model_name_or_path)
    print(format_report(report))
    print(f"report: {eval_args.output_dir}/report.json")
    return 0


def _models(argv: Sequence[str]) -> int:
    from llmq.models import REGISTRY, prepare_model
    from llmq.models.registry import is_prepared, model_directory

    usage = "usage: llmq models list | llmq models prepare NAME\n\n  list     registered models, whether each is prepared, and its cache directory\n  prepare  build a registered model's HF directory in the cache (the embedded model: convert its GGUF once)"
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
    commands = {"train": _train, "generate": _generate, "eval": _eval, "explain": _explain, "models": _models}
    try:
        if command not in commands:
            raise UserError(f"unknown command '{command}'; choose one of train, generate, eval, explain, models")
        return commands[command](rest)
    except UserError as error:
        print(f"llmq {command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"llmq {command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
