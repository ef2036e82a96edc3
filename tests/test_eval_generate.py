"""`llmq eval` and `llmq generate` end to end on real GSM8K rows, and the quickstart recipe on the embedded model."""

import json

import datasets
import numpy as np
import pytest

from llmq.cli import main
from llmq.evaluation.report import score_records
from llmq.stats import bootstrap_interval


def test_bootstrap_interval_brackets_the_mean():
    values = np.array([1.0] * 30 + [0.0] * 70)
    low, high = bootstrap_interval(values, samples=2000, seed=0)
    assert low < 0.3 < high and 0.18 < low and high < 0.42
    assert bootstrap_interval(np.zeros(10)) == (0.0, 0.0)


@pytest.mark.slow
def test_llmq_eval_writes_a_report_with_the_protocol(tmp_path, capsys, data_dir, tiny_model_dir):
    out = tmp_path / "eval"
    argv = [
        "eval",
        "--model_name_or_path",
        "tiny-llama",
        "--data_dir",
        str(data_dir),
        "--limit",
        "3",
        "--max_new_tokens",
        "8",
        "--output_dir",
        str(out),
    ]
    assert main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["protocol"]["task"] == "gsm8k" and report["protocol"]["examples"] == 3
    assert report["protocol"]["decoding"]["temperature"] == 0.0 and "{question}" in report["protocol"]["prompt"]
    assert set(report["metrics"]) == {"first_sample", "answer_format"}
    assert len(report["per_question"]["first_sample"]) == 3
    records = [json.loads(line) for line in (out / "completions.jsonl").read_text().splitlines()]
    assert [r["index"] for r in records] == [0, 1, 2] and all(len(r["verdicts"]) == 1 for r in records)
    assert "first_sample" in capsys.readouterr().out


@pytest.mark.slow
def test_llmq_eval_with_samples_reports_pass_and_majority(tmp_path, data_dir, tiny_model_dir):
    out = tmp_path / "eval"
    argv = [
        "eval",
        "--model_name_or_path",
        "tiny-llama",
        "--data_dir",
        str(data_dir),
        "--task",
        "math500",
        "--limit",
        "2",
        "--max_new_tokens",
        "6",
        "--num_samples",
        "3",
        "--temperature",
        "1.0",
        "--output_dir",
        str(out),
    ]
    assert main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    metrics, curve = report["metrics"], report["pass_at_k"]
    assert {"pass@3", "maj@3"} <= set(metrics)
    assert metrics["pass@3"]["mean"] >= metrics["first_sample"]["mean"]
    records = [json.loads(line) for line in (out / "completions.jsonl").read_text().splitlines()]
    assert list(curve) == ["1", "2", "3"] and curve["3"]["mean"] == metrics["pass@3"]["mean"]
    assert curve["1"]["mean"] == pytest.approx(np.mean([[v["correct"] for v in r["verdicts"]] for r in records]))
    assert "pass@k of the sampled answers" in (out / "report.md").read_text()


def test_pass_at_k_is_the_chance_that_k_draws_include_a_correct_answer():
    from itertools import combinations

    from llmq.stats import pass_at_k

    assert pass_at_k(8, 1, 1) == pytest.approx(1 / 8) and pass_at_k(4, 2, 2) == pytest.approx(5 / 6)
    assert pass_at_k(8, 0, 8) == 0.0 and pass_at_k(8, 1, 8) == 1.0 and pass_at_k(5, 4, 2) == 1.0
    rng = np.random.default_rng(0)
    for _ in range(20):  # exact enumeration of the k-subsets
        n = int(rng.integers(1, 9))
        correct, k = int(rng.integers(0, n + 1)), int(rng.integers(1, n + 1))
        answers = [True] * correct + [False] * (n - correct)
        subsets = list(combinations(answers, k))
        assert pass_at_k(n, correct, k) == pytest.approx(sum(any(s) for s in subsets) / len(subsets))


def test_best_of_k_is_the_chance_that_the_best_scored_of_k_draws_is_correct():
    from itertools import combinations

    from llmq.stats import best_of_k

    assert best_of_k([0.1, 0.9, 0.5], [False, True, False], 1) == pytest.approx(1 / 3)
    assert best_of_k([0.1, 0.9, 0.5], [False, True, False], 3) == 1.0
    rng = np.random.default_rng(0)
    for _ in range(50):  # exact enumeration of the k-subsets, each picking its argmax
        n = int(rng.integers(1, 9))
        scores = rng.integers(0, 4, n).astype(float).tolist()  # few values: ties too
        correct = (rng.random(n) < 0.4).tolist()
        k = int(rng.integers(1, n + 1))
        subsets = list(combinations(range(n), k))
        picked = [subset[int(np.argmax([scores[i] for i in subset]))] for subset in subsets]
        assert best_of_k(scores, correct, k) == pytest.approx(sum(correct[i] for i in picked) / len(subsets))
    with pytest.raises(ValueError, match="k must be between 1 and the 2 scored answers"):
        best_of_k([0.0, 1.0], [True, False], 3)


@pytest.mark.slow
def test_llmq_generate_saves_a_scored_dataset_with_its_settings(tmp_path, data_dir, tiny_model_dir):
    path = tmp_path / "data"
    argv = [
        "generate",
        "--model_name_or_path",
        "tiny-llama",
        "--data_dir",
        str(data_dir),
        "--limit",
        "2",
        "--num_completions",
        "3",
        "--max_new_tokens",
        "6",
        "--format_reward",
        "0.5",
        "--dataset_path",
        str(path),
    ]
    assert main(argv) == 0
    dataset = datasets.load_from_disk(str(path))
    assert len(dataset) == 6 and dataset["question_index"] == [0, 0, 0, 1, 1, 1]
    assert dataset[0]["prompt"][0]["role"] == "user" and dataset[0]["completion"][0]["role"] == "assistant"
    assert all(r["reward"] == float(r["correct"]) + 0.5 * r["formatted"] for r in dataset)
    assert all(r["truncated"] for r in dataset)  # 6 tokens cut every answer of a random model
    settings = json.loads((path / "llmq_generation.json").read_text())
    assert (
        settings["sampling"]["max_new_tokens"] == 6
        and settings["completions"] == 6
        and settings["model"] == "tiny-llama"
    )


@pytest.mark.parametrize("max_new_tokens, truncated", [(64, False), (8, True)])
def test_an_answer_cut_at_the_tasks_own_budget_ends_its_episode(tmp_path, tiny_model_dir, max_new_tokens, truncated):
    # products_3x1digit pins 64 tokens, and llmq eval scores an answer cut there: it is terminal, not truncated
    path = tmp_path / "data"
    argv = ["generate", "--model_name_or_path", "tiny-llama", "--task", "products_3x1digit", "--limit", "2"]
    options = ["--num_completions", "2", "--max_new_tokens", str(max_new_tokens), "--dataset_path", str(path)]
    assert main([*argv, *options]) == 0
    settings = json.loads((path / "llmq_generation.json").read_text())
    assert settings["cut_at_max_new_tokens"] == 4  # a random model never says EOS
    assert datasets.load_from_disk(str(path))["truncated"] == [truncated] * 4


@pytest.mark.slow
def test_quickstart_recipe_runs_end_to_end_on_the_embedded_model(tmp_path, capsys, data_dir, embedded_model_dir):
    out = tmp_path / "quickstart"
    argv = [
        "train",
        "recipes/quickstart.yaml",
        "--engine",  # transformers here; the recipe's in-process vLLM is tested in tests/test_vllm_engine.py
        "hf",
        "--data_dir",
        str(data_dir),
        "--output_dir",
        str(out),
        "--dataset_path",
        str(out / "data"),
        "--build_limit",
        "2",
        "--build_num_completions",
        "2",
        "--build_max_new_tokens",
        "24",
        "--benchmark_limit",
        "2",
        "--benchmark_max_new_tokens",
        "24",
        "--per_device_train_batch_size",
        "2",
        "--max_steps",
        "2",
        "--mixed_groups_only",  # 2 questions × 2 answers of 24 tokens seldom hold a right and a wrong one
        "false",
        "--seed",
        "3",
    ]
    assert main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert json.loads((out / "data" / "llmq_generation.json").read_text())["generate_config"]["seed"] == 3
    assert summary["train_rows"] == 4 and set(summary["change"]) == {"first_sample", "answer_format"}
    assert (out / "model.safetensors").is_file()
    printed = capsys.readouterr().out
    assert "benchmark before shiq:" in printed and "benchmark after shiq:" in printed
    assert "change after shiq" in printed


def test_maj_at_n_is_right_when_the_most_frequent_answer_is_right_and_ties_go_to_the_answer_seen_first():
    def verdict(answer, correct):
        return {"answer": answer, "correct": correct, "formatted": answer is not None}

    records = [
        {"verdicts": [verdict("5", False), verdict("7", True), verdict("7", True)]},
        {"verdicts": [verdict("7", True), verdict("5", False), verdict("5", False)]},
        {"verdicts": [verdict("3", True), verdict("4", False), verdict(None, False)]},
        {"verdicts": [verdict(None, False), verdict(None, False), verdict(None, False)]},
    ]
    metrics = score_records(records, num_samples=3, num_candidates=3, selecting=False)["metrics"]
    assert metrics["maj@3"]["mean"] == pytest.approx(2 / 4)
