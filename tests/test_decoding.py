"""Q-guided decoding: exact on the oracle MDP (π_ref·exp(A*/β) = π*), and inside transformers' generate
(KV cache, left padding, expanded rows, beam reordering) against full forward passes of the guide."""

import copy
import json

import numpy as np
import pytest
import torch
from transformers import LogitsProcessorList

from llmq.decoding import QGuidedLogitsProcessor
from llmq.rollout import HFEngine, SamplingParams
from llmq.testing import TabularLM, random_mdp, soft_optimal, toy_mdp


def optimal_guide(mdp, beta):
    """A tabular policy whose shifted-logit Q view is the exact Q* (ℓ = ℓ_ref + Q*/β, E5)."""
    values = soft_optimal(mdp, beta)
    guide = TabularLM.reference(mdp)
    with torch.no_grad():
        for state, row in mdp.state_index.items():
            guide.table[row] += torch.as_tensor(values.q[state] / beta, dtype=guide.table.dtype)
    return guide, values


MDPS = [("toy", toy_mdp(), 0.5), ("toy-beta1", toy_mdp(), 1.0)] + [
    (f"random-{seed}", random_mdp(seed, vocab_size=3, horizon=3), 0.5 + 0.25 * seed) for seed in range(3)
]


@pytest.mark.parametrize(("name", "mdp", "beta"), MDPS, ids=[m[0] for m in MDPS])
def test_guidance_by_the_exact_q_star_gives_pi_star_in_every_state(name, mdp, beta):
    guide, values = optimal_guide(mdp, beta)
    reference = TabularLM.reference(mdp)
    processor = QGuidedLogitsProcessor(guide, beta=beta, top_k=0)
    for state in mdp.states:
        ids = torch.tensor([[mdp.bos_id, *state]])
        scores = reference(ids).logits[:, -1]
        guided = torch.softmax(processor(ids, scores), dim=-1)[0]
        np.testing.assert_allclose(guided[: mdp.n_actions].numpy(), values.pi[state], atol=1e-9)
        assert guided[mdp.n_actions :].sum() < 1e-9  # non-action tokens stay out


@pytest.mark.parametrize(("name", "mdp", "beta"), MDPS, ids=[m[0] for m in MDPS])
def test_a_q_model_holding_q_star_over_beta_guides_the_reference_to_pi_star_in_every_state(name, mdp, beta):
    """The cheap guide of §6.5: its logits are Q*/β alone (no reference inside it)."""
    values = soft_optimal(mdp, beta)
    q_model, reference = TabularLM(mdp, "zeros"), TabularLM.reference(mdp)
    with torch.no_grad():
        for state, row in mdp.state_index.items():
            q_model.table[row] = torch.as_tensor(values.q[state] / beta, dtype=q_model.table.dtype)
    processor = QGuidedLogitsProcessor(q_model, beta=beta, top_k=0, q_model=True)
    for state in mdp.states:
        ids = torch.tensor([[mdp.bos_id, *state]])
        guided = torch.softmax(processor(ids, reference(ids).logits[:, -1]), dim=-1)[0]
        np.testing.assert_allclose(guided[: mdp.n_actions].numpy(), values.pi[state], atol=1e-9)


def test_guided_sampling_driven_by_q_star_samples_pi_star():
    """Total variation between sampled and exact π* trajectory distributions < 1e-2 (fixed seed)."""
    mdp, beta, samples = toy_mdp(), 0.5, 100_000
    guide, values = optimal_guide(mdp, beta)
    reference = TabularLM.reference(mdp)
    processor = QGuidedLogitsProcessor(guide, beta=beta, top_k=0)
    generator = torch.Generator().manual_seed(0)
    ids = torch.full((samples, 1), mdp.bos_id)
    for _ in range(mdp.horizon):
        probs = torch.softmax(processor(ids, reference(ids).logits[:, -1]), dim=-1)
        ids = torch.cat([ids, torch.multinomial(probs, 1, generator=generator)], dim=1)
    counts: dict[tuple, int] = {}
    for row in ids[:, 1:].tolist():
        end = next(t for t in range(1, len(row) + 1) if mdp.is_terminal(row[:t]))
        counts[tuple(row[:end])] = counts.get(tuple(row[:end]), 0) + 1
    exact = dict(mdp.trajectories(values.pi))
    assert set(counts) <= {seq for seq, p in exact.items() if p > 0}
    total_variation = 0.5 * sum(abs(counts.get(seq, 0) / samples - p) for seq, p in exact.items())
    assert total_variation < 1e-2
    # π_ref differs from π* by far more than the sampling noise, so the test can tell them apart.
    reference_tv = 0.5 * sum(abs(p - exact[seq]) for seq, p in mdp.trajectories())
    assert reference_tv > 0.1


def test_a_smaller_guidance_temperature_on_a_bandit_gives_the_optimum_at_that_beta():
    """One step: A* = r − V*, so π_ref·exp(A*_β/β_dec) = π*_{β_dec} for any β_dec."""
    mdp = random_mdp(3, vocab_size=4, horizon=1)
    guide, _ = optimal_guide(mdp, beta=1.0)
    scores = TabularLM.reference(mdp)(torch.tensor([[mdp.bos_id]])).logits[:, -1]
    for guidance_temperature in (0.25, 0.5, 2.0):
        guided = torch.softmax(
            QGuidedLogitsProcessor(guide, beta=1.0, guidance_temperature=guidance_temperature, top_k=0)(
                torch.tensor([[mdp.bos_id]]), scores
            ),
            dim=-1,
        )
        np.testing.assert_allclose(
            guided[0, : mdp.n_actions].numpy(), soft_optimal(mdp, guidance_temperature).pi[()], atol=1e-9
        )


PROMPTS = ["Hello there, a much longer prompt", "Hi", "What is 2+2? then"]


def encode(tokenizer):
    tokenizer.padding_side = "left"
    return tokenizer(PROMPTS, return_tensors="pt", padding=True, add_special_tokens=False)


def full_forward_logprobs(model, sequences, prompt_mask):
    mask = torch.cat(
        [prompt_mask, torch.ones(len(sequences), sequences.shape[1] - prompt_mask.shape[1], dtype=prompt_mask.dtype)],
        dim=1,
    )
    with torch.no_grad():
        logits = model(
            input_ids=sequences, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)
        ).logits
    return torch.log_softmax(logits.float(), dim=-1)


def test_guided_sampling_in_generate_follows_the_guide_through_its_kv_cache(base_and_guide):
    """β_dec = β and no top-k: every step's processed scores are the guide's own log-probs of the
    sampled prefix, for left-padded prompts expanded to several samples each."""
    base, guide, tokenizer = base_and_guide
    encoded = encode(tokenizer)
    processor = QGuidedLogitsProcessor(guide, beta=0.1, top_k=0, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    output = base.generate(
        **encoded,
        do_sample=True,
        top_k=0,
        num_return_sequences=2,
        max_new_tokens=8,
        logits_processor=LogitsProcessorList([processor]),
        output_scores=True,
        return_dict_in_generate=True,
        pad_token_id=tokenizer.pad_token_id,
    )
    prompt_length = encoded["input_ids"].shape[1]
    expected = full_forward_logprobs(guide, output.sequences, encoded["attention_mask"].repeat_interleave(2, dim=0))
    for step, scores in enumerate(output.scores):
        torch.testing.assert_close(
            torch.log_softmax(scores, dim=-1), expected[:, prompt_length - 1 + step], atol=1e-4, rtol=0
        )


def test_guided_beam_search_at_guidance_temperature_equal_to_beta_is_beam_search_on_the_guide(base_and_guide):
    """§3.6: ranking by Σ log π_ref + A/β is ranking by the guide's likelihood; the processor
    follows beam search's row reordering."""
    base, guide, tokenizer = base_and_guide
    encoded = encode(tokenizer)
    options = dict(
        num_beams=3,
        num_return_sequences=3,
        length_penalty=0.0,
        max_new_tokens=10,
        do_sample=False,
        output_scores=True,
        return_dict_in_generate=True,
        pad_token_id=tokenizer.pad_token_id,
    )
    processor = QGuidedLogitsProcessor(guide, beta=0.1, top_k=0, pad_token_id=tokenizer.pad_token_id)
    guided = base.generate(**encoded, logits_processor=LogitsProcessorList([processor]), **options)
    direct = guide.generate(**encoded, **options)
    assert torch.equal(guided.sequences, direct.sequences)
    torch.testing.assert_close(guided.sequences_scores, direct.sequences_scores, atol=1e-4, rtol=0)


def test_guided_scores_are_the_weighted_log_ratio_on_the_base_top_k(base_and_guide):
    base, guide, tokenizer = base_and_guide
    encoded = encode(tokenizer)
    with torch.no_grad():
        scores = base(**encoded).logits[:, -1]
    processor = QGuidedLogitsProcessor(
        guide, beta=0.1, guidance_temperature=0.05, top_k=5, pad_token_id=tokenizer.pad_token_id
    )
    guided = processor(encoded["input_ids"], scores)
    base_logp = torch.log_softmax(scores, dim=-1)
    guide_logp = full_forward_logprobs(guide, encoded["input_ids"], encoded["attention_mask"])[:, -1]
    top = torch.topk(base_logp, 5, dim=-1).indices
    kept = torch.isfinite(guided)
    assert kept.sum(dim=-1).tolist() == [5, 5, 5]
    assert torch.equal(kept, torch.zeros_like(kept).scatter(-1, top, True))
    expected = base_logp + 2.0 * (guide_logp - base_logp)  # β/β_dec = 2
    torch.testing.assert_close(guided[kept], expected[kept], atol=1e-4, rtol=0)


def test_one_processor_serves_consecutive_generate_calls(base_and_guide):
    base, guide, tokenizer = base_and_guide
    processor = QGuidedLogitsProcessor(guide, beta=0.1, pad_token_id=tokenizer.pad_token_id)
    engine = HFEngine(base, tokenizer, batch_size=2, progress=False, logits_processor=[processor])
    first = engine.generate(PROMPTS, sampling=SamplingParams(max_new_tokens=6))
    again = HFEngine(
        base,
        tokenizer,
        batch_size=2,
        progress=False,
        logits_processor=[QGuidedLogitsProcessor(guide, beta=0.1, pad_token_id=tokenizer.pad_token_id)],
    ).generate(PROMPTS, sampling=SamplingParams(max_new_tokens=6))
    assert [c[0].token_ids for c in first] == [c[0].token_ids for c in again]


def test_engine_beam_search_returns_the_top_beams_with_the_models_logprobs(base_and_guide):
    base, _, tokenizer = base_and_guide
    engine = HFEngine(base, tokenizer, batch_size=3, progress=False)
    results = engine.generate(PROMPTS, n=2, sampling=SamplingParams(max_new_tokens=8, num_beams=3))
    encoded = encode(tokenizer)
    direct = base.generate(
        **encoded,
        num_beams=3,
        num_return_sequences=2,
        length_penalty=0.0,
        max_new_tokens=8,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
    )
    prompt_length = encoded["input_ids"].shape[1]
    for row, completion in enumerate(c for pair in results for c in pair):
        generated = direct[row, prompt_length:].tolist()
        assert completion.token_ids == generated[: len(completion.token_ids)]
    # beam order: the first completion's summed log-prob is at least the second's
    for first, second in results:
        assert sum(first.logprobs) >= sum(second.logprobs) - 1e-4
    with pytest.raises(ValueError, match="at most num_beams"):
        engine.generate(PROMPTS, n=4, sampling=SamplingParams(max_new_tokens=4, num_beams=3))


@pytest.mark.slow
@pytest.mark.parametrize("decoding", ["guided", "beam"])
def test_llmq_generate_decodes_with_a_guide_and_records_how(decoding, tmp_path, data_dir, tiny_model_dir, guide_dir):
    import datasets

    from llmq.cli import main

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
        "2",
        "--max_new_tokens",
        "6",
        "--decoding",
        decoding,
        "--num_beams",
        "3",
        "--guide_model",
        str(guide_dir),
        "--guide_beta",
        "0.1",
        "--guidance_temperature",
        "0.05",
        "--dataset_path",
        str(path),
    ]
    assert main(argv) == 0
    dataset = datasets.load_from_disk(str(path))
    assert dataset["question_index"] == [0, 0, 1, 1]
    settings = json.loads((path / "llmq_generation.json").read_text())
    assert settings["generate_config"]["decoding"] == decoding and settings["generate_config"]["guide_model"] == str(
        guide_dir
    )
    assert settings["sampling"]["num_beams"] == (3 if decoding == "beam" else 1)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--decoding", "guided"], "decoding guided needs key 'guide_model'"),
        (
            ["--decoding", "sample", "--guide_model", "tiny-llama"],
            "key 'guide_model' is used by decoding guided or beam",
        ),
        (["--decoding", "beam", "--num_beams", "2", "--num_completions", "3"], "must not exceed 'num_beams'"),
        (["--decoding", "greedy", "--num_completions", "2"], "key 'num_completions' > 1 needs 'temperature' > 0"),
        (["--decoding", "guided", "--guide_model", "no/such/dir/"], "key 'guide_model'"),
        (["--decoding", "nucleus"], "invalid choice: 'nucleus'"),
    ],
)
def test_llmq_generate_rejects_inconsistent_decoding_settings(flags, message, capsys, tiny_model_dir):
    from llmq.cli import main

    assert main(["generate", "--model_name_or_path", "tiny-llama", *flags]) == 2
    assert message in capsys.readouterr().err


def test_a_guide_with_another_vocabulary_is_refused(tmp_path, capsys, data_dir, base_and_guide):
    from llmq.cli import main

    _, guide, tokenizer = base_and_guide
    other = copy.deepcopy(tokenizer)
    other.add_tokens(["<extra>"])
    guide.save_pretrained(tmp_path / "guide")
    other.save_pretrained(tmp_path / "guide")
    argv = [
        "generate",
        "--model_name_or_path",
        "tiny-llama",
        "--data_dir",
        str(data_dir),
        "--limit",
        "1",
        "--num_completions",
        "1",
        "--decoding",
        "guided",
        "--guide_model",
        str(tmp_path / "guide"),
        "--dataset_path",
        str(tmp_path / "data"),
    ]
    assert main(argv) == 2
    assert "tokenizer of" in capsys.readouterr().err


@pytest.mark.slow
def test_llmq_eval_with_guided_beam_search_records_its_decoding(tmp_path, data_dir, tiny_model_dir, guide_dir):
    from llmq.cli import main

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
        "--num_samples",
        "2",
        "--decoding",
        "beam",
        "--num_beams",
        "2",
        "--guide_model",
        str(guide_dir),
        "--output_dir",
        str(out),
    ]
    assert main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    decoding = report["protocol"]["decoding"]
    assert decoding["decoding"] == "beam" and decoding["num_beams"] == 2 and decoding["guide_model"] == str(guide_dir)
    assert {"pass@2", "maj@2"} <= set(report["metrics"])
