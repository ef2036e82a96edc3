"""`llmq eval` survives a kill: completions are appended per batch, a rerun finishes the missing
questions with the same seeds, and the report equals an uninterrupted run's; plus its Markdown
summary, plot and the protocol guard."""

import copy
import json

import pytest
import torch

from llmq.cli import main
from llmq.errors import UserError
from llmq.evaluation import EvalConfig, evaluate
from llmq.rollout import HFEngine


def config(output_dir, data_dir, **overrides) -> EvalConfig:
    settings = dict(
        data_dir=str(data_dir),
        limit=5,
        batch_size=2,
        max_new_tokens=6,
        temperature=1.0,
        num_samples=2,
        output_dir=str(output_dir),
    )
    return EvalConfig(**(settings | overrides))


def completions_by_question(output_dir):
    records = {}
    for line in (output_dir / "completions.jsonl").read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        records[record["index"]] = record["completions"]
    return records


class Killed(Exception):
    """Stands for the process being killed between two batches."""


def test_a_killed_evaluation_resumes_to_the_same_report(tmp_path, data_dir, tiny_model_and_tokenizer, monkeypatch):
    model, tokenizer = tiny_model_and_tokenizer
    whole = evaluate(model, tokenizer, config(tmp_path / "whole", data_dir), model_name="tiny-llama")

    generate, calls, kill = HFEngine.generate, [], [True]

    def killed_on_the_second_batch(self, prompts, n=1, sampling=None):
        calls.append(len(prompts))
        if kill[0] and len(calls) == 2:
            raise Killed
        return generate(self, prompts, n, sampling)

    monkeypatch.setattr(HFEngine, "generate", killed_on_the_second_batch)
    with pytest.raises(Killed):
        evaluate(model, tokenizer, config(tmp_path / "resumed", data_dir), model_name="tiny-llama")
    assert set(completions_by_question(tmp_path / "resumed")) == {0, 1}  # the first batch survived
    with open(tmp_path / "resumed" / "completions.jsonl", "a") as cache:
        cache.write('{"index": 2, "completions": ["cut sho')  # a kill in the middle of a write

    calls.clear()
    kill[0] = False
    resumed = evaluate(model, tokenizer, config(tmp_path / "resumed", data_dir), model_name="tiny-llama")
    assert calls == [2, 1]  # only the two missing batches were generated
    assert resumed["metrics"] == whole["metrics"] and resumed["per_question"] == whole["per_question"]
    assert resumed["generated_tokens"] == whole["generated_tokens"] and resumed["protocol"] == whole["protocol"]
    assert completions_by_question(tmp_path / "resumed") == completions_by_question(tmp_path / "whole")

    calls.clear()  # a finished run re-reports without generating anything
    assert (
        evaluate(model, tokenizer, config(tmp_path / "resumed", data_dir), model_name="tiny-llama")["metrics"]
        == whole["metrics"]
    )
    assert calls == []


def test_another_protocol_in_the_same_folder_is_refused_or_restarted(tmp_path, data_dir, tiny_model_and_tokenizer):
    model, tokenizer = tiny_model_and_tokenizer
    evaluate(model, tokenizer, config(tmp_path, data_dir), model_name="tiny-llama")
    with pytest.raises(UserError, match="differs in: decoding"):
        evaluate(model, tokenizer, config(tmp_path, data_dir, max_new_tokens=4), model_name="tiny-llama")
    retrained = copy.deepcopy(model)
    with torch.no_grad():
        next(retrained.parameters()).add_(0.01)
    with pytest.raises(UserError, match="differs in: weights_checksum"):
        evaluate(retrained, tokenizer, config(tmp_path, data_dir), model_name="tiny-llama")
    report = evaluate(
        retrained, tokenizer, config(tmp_path, data_dir), model_name="tiny-llama", restart_on_mismatch=True
    )
    assert len(completions_by_question(tmp_path)) == 5 and report["protocol"]["examples"] == 5


@pytest.mark.slow
def test_report_markdown_and_plot_compare_decodings(tmp_path, data_dir, tiny_model_dir):
    common = [
        "eval",
        "--model_name_or_path",
        "tiny-llama",
        "--data_dir",
        str(data_dir),
        "--limit",
        "3",
        "--max_new_tokens",
        "6",
    ]
    assert main([*common, "--output_dir", str(tmp_path / "greedy")]) == 0
    assert (
        main(
            [
                *common,
                "--decoding",
                "beam",
                "--num_beams",
                "2",
                "--output_dir",
                str(tmp_path / "beam"),
                "--compare_with",
                str(tmp_path / "greedy"),
            ]
        )
        == 0
    )
    markdown = (tmp_path / "beam" / "report.md").read_text()
    assert (
        "| tiny-llama | beam 2 | first_sample |" in markdown and "| tiny-llama | greedy | first_sample |" in markdown
    )
    assert (tmp_path / "beam" / "accuracy_vs_tokens.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main([*common, "--output_dir", str(tmp_path / "x"), "--compare_with", str(tmp_path / "nothing")]) == 2


def test_completions_without_a_protocol_are_not_trusted(tmp_path, data_dir, tiny_model_and_tokenizer):
    model, tokenizer = tiny_model_and_tokenizer
    (tmp_path / "completions.jsonl").write_text('{"index": 0, "completions": ["old"]}\n')
    with pytest.raises(UserError, match="holds completions of another evaluation"):
        evaluate(model, tokenizer, config(tmp_path, data_dir), model_name="tiny-llama")
