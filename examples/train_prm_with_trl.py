"""Train a process reward model (PRM) with TRL's ``PRMTrainer`` on the step labels llmq writes, for
``search_utility: prm`` and ``scorer: prm``.

    llmq train recipes/qstar/products_smollm2.yaml        # writes outputs/qvm_products_smollm2/stepwise.jsonl
    PYTHONPATH=.venv/trl-prm python examples/train_prm_with_trl.py \
        --stepwise outputs/qvm_products_smollm2/stepwise.jsonl --output_dir outputs/prm_products_smollm2
    llmq eval --task products_3x1digit --limit 200 --decoding best_of_n --num_candidates 8 --temperature 0.8 \
        --scorer prm --prm_path outputs/prm_products_smollm2 --search_aggregate min

TRL removed ``PRMTrainer`` after 1.13 (huggingface/trl#7133), and llmq pins a later TRL, so the trainer comes
from TRL 1.13 in a side folder that ``make install`` fills (``pip install --no-deps --target .venv/trl-prm
trl==1.13.0``: it uses the transformers, accelerate and datasets of llmq's environment). Every
``llmq train --method qvm`` run writes ``stepwise.jsonl`` in TRL's stepwise-supervision format (``prompt``,
``completions``, ``labels``; docs/algorithms.md §4.4), with ``delimiter`` as the step separator. The PRM is the base
model with a two-label token-classification head, trained in fp32 (bf16 is unusable on CPU).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import datasets
import torch
from transformers import AutoModelForTokenClassification

from llmq.models.registry import load_tokenizer, resolve_model


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stepwise", required=True, help="Step labels in TRL's stepwise-supervision format (.jsonl).")
    parser.add_argument("--model_name_or_path", default="smollm2-135m-instruct", help="Base model of the PRM.")
    parser.add_argument("--output_dir", required=True, help="Where the PRM checkpoint goes (prm_path).")
    parser.add_argument("--step_separator", default="\n", help="The delimiter the steps were cut at.")
    parser.add_argument("--num_train_epochs", type=float, default=3.0)
    parser.add_argument("--learning_rate", type=float, default=1e-5)
    parser.add_argument("--per_device_train_batch_size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = make_parser().parse_args(argv)
    if not Path(args.stepwise).is_file():
        print(
            f"--stepwise {args.stepwise}: no such file (llmq train --method qvm writes stepwise.jsonl)",
            file=sys.stderr,
        )
        sys.exit(2)
    try:
        from trl.experimental.prm import PRMConfig, PRMTrainer
    except ImportError:
        print(
            "TRL's PRMTrainer is not importable: install trl<=1.13 beside llmq (this script's docstring)",
            file=sys.stderr,
        )
        sys.exit(2)
    tokenizer = load_tokenizer(args.model_name_or_path)
    model = AutoModelForTokenClassification.from_pretrained(
        resolve_model(args.model_name_or_path), num_labels=2, dtype=torch.float32
    )
    model.config.pad_token_id = tokenizer.pad_token_id
    config = PRMConfig(
        output_dir=args.output_dir,
        step_separator=args.step_separator,
        num_train_epochs=args.num_train_epochs,
        learning_rate=args.learning_rate,
        per_device_train_batch_size=args.per_device_train_batch_size,
        bf16=False,
        gradient_checkpointing=False,
        save_strategy="no",
        report_to="none",
        seed=args.seed,
    )
    dataset = datasets.load_dataset("json", data_files=args.stepwise, split="train")
    trainer = PRMTrainer(model=model, args=config, processing_class=tokenizer, train_dataset=dataset)
    trainer.train()
    trainer.save_model(args.output_dir)


if __name__ == "__main__":
    main()
