"""Best-of-N and maj@N: selection rules, the implicit-reward scorer (oracle: it ranks like the true
return), the llmq generate / eval decodings, and best-of-N extraction → SFT (`llmq train method: sft`)."""

import json

import datasets
import numpy as np
import pytest
import torch

from llmq.cli import main
from llmq.data.trajectories import TrajectoryCollator, tokenize_trajectory
from llmq.decoding.best_of_n import ImplicitRewardScorer, best_of_n, likelihood_scores, majority_vote
from llmq.mdp import token_logprobs
from llmq.qfunctions import ImplicitQ
from llmq.rollout import Completion, HFEngine, SamplingParams
from llmq.testing import TabularLM, make_batch, soft_optimal, toy_mdp


def test_best_of_n_keeps_the_highest_scores_best_first_and_earlier_on_ties():
    assert best_of_n([0.1, 0.7, 0.3, 0.7], keep=1) == [1]
    assert best_of_n([0.1, 0.7, 0.3, 0.7], keep=3) == [1, 3, 2]


@pytest.mark.parametrize(
    ("answers", "scores", "expected"),
    [
        (["4", "5", "4", None], None, 0),  # most frequent answer, its first candidate
        (
            ["4", "5", "4", "5"],
            [0.0, 1.0, 0.2, 0.5],
            1,
        ),  # tie on votes: the answer with more total score; its best candidate
        (["4", "5", "4", "5"], None, 0),  # tie without scores: the answer seen first
        (["7", "4", "4"], [0.0, 0.1, 0.9], 2),  # the best-scored candidate among the majority answer's
        ([None, None], None, 0),  # nobody answered
    ],
)
def test_majority_vote(answers, scores, expected):
    assert majority_vote(answers, scores) == expected


def test_best_of_n_by_the_implicit_reward_of_pi_star_picks_the_true_best():
    """(R2) Σ_t β log π*/π_ref = R(y) − V*(x): ranking sampled trajectories by the implicit reward
    of the optimal policy is ranking them by their true return, so best-of-N finds the best one."""
    mdp, beta = toy_mdp(), 0.5
    values = soft_optimal(mdp, beta)
    policy = TabularLM.reference(mdp)
    with torch.no_grad():
        for state, row in mdp.state_index.items():
            policy.table[row] += torch.as_tensor(values.q[state] / beta, dtype=policy.table.dtype)
    rng = np.random.default_rng(0)
    trajectories, probs = zip(*mdp.trajectories())
    sampled = [trajectories[i] for i in rng.choice(len(trajectories), size=16, p=np.asarray(probs) / sum(probs))]
    batch = make_batch(mdp, sampled)
    implicit = (
        ImplicitQ(policy, TabularLM.reference(mdp), beta).advantages(batch["input_ids"]) * batch["act_mask"]
    ).sum(-1)
    returns = [mdp.trajectory_return(seq) for seq in sampled]
    np.testing.assert_allclose(implicit.numpy(), np.asarray(returns) - values.v[()], atol=1e-9)
    [best] = best_of_n(implicit.tolist())
    assert returns[best] == max(returns)
    assert len(set(returns)) > 1  # the sample holds worse trajectories to beat


def test_implicit_reward_scorer_sums_beta_log_ratios_over_the_completion(base_and_guide):
    base, guide, tokenizer = base_and_guide
    prompts = [[{"role": "user", "content": "What is 2+2?"}], "Once upon a time"]
    candidates = HFEngine(base, tokenizer, progress=False).generate(
        prompts, n=3, sampling=SamplingParams(max_new_tokens=6, temperature=1.0)
    )
    scores = ImplicitRewardScorer(guide, base, 0.1, tokenizer, batch_size=4)(prompts, candidates)
    assert [len(group) for group in scores] == [3, 3]
    for prompt, group, group_scores in zip(prompts, candidates, scores):
        for completion, score in zip(group, group_scores):
            row = (
                {"prompt": prompt, "completion": completion.text, "reward": 0.0}
                if isinstance(prompt, str)
                else {
                    "prompt": prompt,
                    "completion": [{"role": "assistant", "content": completion.text}],
                    "reward": 0.0,
                }
            )
            batch = TrajectoryCollator(tokenizer.pad_token_id)(
                [tokenize_trajectory(row, tokenizer, max_length=10**9, index=0)]
            )
            with torch.no_grad():
                policy_logp, _ = token_logprobs(guide(batch["input_ids"]).logits, batch["input_ids"])
                ref_logp, _ = token_logprobs(base(batch["input_ids"]).logits, batch["input_ids"])
            expected = 0.1 * ((policy_logp - ref_logp) * batch["act_mask"]).sum().item()
            assert score == pytest.approx(expected, abs=1e-5)
    # the reference against itself has no implicit reward
    assert np.allclose(ImplicitRewardScorer(base, base, 0.1, tokenizer)(prompts, candidates), 0.0)


def test_likelihood_scores_are_the_summed_logprobs():
    group = [Completion("a", [1, 2], [-0.5, -1.0], "stop"), Completion("b", [3], [-0.25], "length")]
    assert likelihood_scores(["p"], [group]) == [[-1.5, -0.25]]


@pytest.mark.slow
def test_llmq_generate_best_of_n_keeps_the_top_candidates_with_their_scores(tmp_path, data_dir, tiny_model_dir):
    path = tmp_path / "data"
    argv = [
        "generate",
        "--model_name_or_path",
        "tiny-llama",
        "--data_dir",
        str(data_dir),
        "--limit",
        "2",
        "--max_new_tokens",
        "6",
        "--temperature",
        "1.0",
        "--decoding",
        "best_of_n",
        "--num_candidates",
        "4",
        "--num_completions",
        "2",
        "--scorer",
        "likelihood",
        "--dataset_path",
        str(path),
    ]
    assert main(argv) == 0
    dataset = datasets.load_from_disk(str(path))
    assert dataset["question_index"] == [0, 0, 1, 1] and set(dataset["candidates"]) == {4}
    assert dataset["score"][0] >= dataset["score"][1] and dataset["score"][2] >= dataset["score"][3]
    settings = json.loads((path / "llmq_generation.json").read_text())
    assert settings["candidates"] == 8 and settings["completions"] == 4


def test_best_of_n_extraction_that_keeps_nothing_is_an_error(tmp_path, capsys, data_dir, tiny_model_dir):
    argv = [
        "generate",
        "--model_name_or_path",
        "tiny-llama",
        "--data_dir",
        str(data_dir),
        "--limit",
        "2",
        "--max_new_tokens",
        "4",
        "--temperature",
        "1.0",
        "--decoding",
        "best_of_n",
        "--num_candidates",
        "2",
        "--num_completions",
        "1",
        "--min_score",
        "1.0",
        "--dataset_path",
        str(tmp_path / "data"),
    ]
    assert main(argv) == 2  # a random model answers nothing correctly
    assert "min_score 1.0" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("decoding", ["best_of_n", "maj_at_n"])
def test_llmq_eval_selects_one_answer_from_scored_candidates(decoding, tmp_path, data_dir, tiny_model_dir, guide_dir):
    out = tmp_path / "eval"
    argv = [
        "eval",
        "--model_name_or_path",
        "tiny-llama",
        "--data_dir",
        str(data_dir),
        "--limit",
        "2",
        "--max_new_tokens",
        "6",
        "--temperature",
        "1.0",
        "--decoding",
        decoding,
        "--num_candidates",
        "3",
        "--scorer",
        "implicit_reward",
        "--guide_model",
        str(guide_dir),
        "--output_dir",
        str(out),
    ]
    assert main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    assert (
        report["protocol"]["decoding"]["decoding"] == decoding
        and report["protocol"]["decoding"]["scorer"] == "implicit_reward"
    )
    records = [json.loads(line) for line in (out / "completions.jsonl").read_text().splitlines()]
    for record in records:
        assert len(record["completions"]) == 1 and len(record["candidates"]) == 3
        if decoding == "best_of_n":
            best = max(record["candidates"], key=lambda c: c["score"])
            assert record["completions"][0] == best["text"]
    # the sampler's own pass@k, from every candidate, beside the selected answer's accuracy
    assert list(report["pass_at_k"]) == ["1", "2", "3"]
    assert report["metrics"]["candidates_pass@3"]["count"] == sum(
        any(c["correct"] for c in r["candidates"]) for r in records
    )
    assert report["pass_at_k"]["1"]["mean"] == pytest.approx(
        np.mean([[c["correct"] for c in r["candidates"]] for r in records])
    )


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--decoding", "best_of_n", "--temperature", "0"], "needs 'temperature' > 0 and 'num_candidates' >= 2"),
        (
            ["--decoding", "best_of_n", "--num_candidates", "2", "--num_completions", "3"],
            "must not exceed 'num_candidates'",
        ),
        (["--decoding", "maj_at_n", "--num_completions", "2"], "must be 1 with decoding maj_at_n"),
        (["--decoding", "best_of_n", "--scorer", "implicit_reward"], "scorer implicit_reward needs key 'guide_model'"),
        (["--min_score", "0.5"], "key 'min_score' needs decoding best_of_n"),
    ],
)
def test_inconsistent_best_of_n_settings_are_refused(flags, message, capsys, tiny_model_dir):
    assert main(["generate", "--model_name_or_path", "tiny-llama", "--num_completions", "1", *flags]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.slow
def test_llmq_train_sft_fine_tunes_on_extracted_best_of_n_samples(tmp_path, data_dir, tiny_model_dir):
    """method sft: extraction keeps each question's best sample above build_min_score, then TRL's SFTTrainer trains on
    it."""
    out = tmp_path / "sft"
    argv = [
        "train",
        "--method",
        "sft",
        "--model_name_or_path",
        "tiny-llama",
        "--output_dir",
        str(out),
        "--dataset_path",
        str(out / "data"),
        "--data_dir",
        str(data_dir),
        "--build_task",
        "gsm8k",
        "--build_limit",
        "3",
        "--build_num_completions",
        "2",
        "--build_max_new_tokens",
        "4",
        "--build_min_score",
        "0.0",
        "--max_steps",
        "2",
        "--per_device_train_batch_size",
        "2",
        "--report_to",
        "none",
        "--save_strategy",
        "no",
    ]
    assert main(argv) == 0
    dataset = datasets.load_from_disk(str(out / "data"))
    assert len(dataset) == 3 and set(dataset["candidates"]) == {2}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == "sft" and summary["train_rows"] == 3 and np.isfinite(summary["train"]["train_loss"])
    assert (out / "model.safetensors").is_file()
