"""HFEngine on a tiny random model: shapes, greedy equivalence, logprobs, seeds, stops, padding."""

import copy
import dataclasses

import pytest
import torch

from llmq.mdp import token_logprobs
from llmq.rollout import HFEngine, SamplingParams


@pytest.fixture()
def engine(tiny_model_and_tokenizer):
    model, tokenizer = tiny_model_and_tokenizer
    return HFEngine(model, tokenizer, batch_size=4, progress=False)


PROMPTS = [
    [{"role": "user", "content": "What is 2+2?"}],
    "Once upon a time",
    [{"role": "user", "content": "A much longer question, to force left padding in the batch?"}],
]


def test_greedy_matches_a_manual_argmax_loop_and_logprobs_match_a_forward_pass(engine):
    model, tokenizer = engine.model, engine.tokenizer
    results = engine.generate(PROMPTS, n=1, sampling=SamplingParams(max_new_tokens=12))
    assert [len(r) for r in results] == [1, 1, 1]
    for prompt, [completion] in zip(PROMPTS, results):
        ids = tokenizer(engine.render(prompt), return_tensors="pt", add_special_tokens=False)["input_ids"]
        prompt_length = ids.shape[1]
        with torch.no_grad():
            for _ in range(len(completion.token_ids)):
                next_id = model(ids).logits[0, -1].argmax()
                ids = torch.cat([ids, next_id.view(1, 1)], dim=1)
            logp, _ = token_logprobs(model(ids).logits, ids)
        assert completion.token_ids == ids[0, prompt_length:].tolist()
        assert torch.allclose(torch.tensor(completion.logprobs), logp[0, prompt_length:], atol=1e-4)
        assert completion.finish_reason == ("stop" if completion.token_ids[-1] == tokenizer.eos_token_id else "length")


def test_batching_does_not_change_greedy_results(engine, tiny_model_and_tokenizer):
    model, tokenizer = tiny_model_and_tokenizer
    batched = engine.generate(PROMPTS, sampling=SamplingParams(max_new_tokens=10))
    single = HFEngine(model, tokenizer, batch_size=1, progress=False).generate(
        PROMPTS, sampling=SamplingParams(max_new_tokens=10)
    )
    assert [c[0].token_ids for c in batched] == [c[0].token_ids for c in single]


def test_sampling_n_per_prompt_is_seeded(engine):
    sampling = SamplingParams(max_new_tokens=8, temperature=1.0, seed=3)
    first = engine.generate(PROMPTS, n=4, sampling=sampling)
    again = engine.generate(PROMPTS, n=4, sampling=sampling)
    other = engine.generate(PROMPTS, n=4, sampling=SamplingParams(max_new_tokens=8, temperature=1.0, seed=4))
    assert [len(r) for r in first] == [4, 4, 4]

    def tokens(results):
        return [[c.token_ids for c in r] for r in results]

    assert tokens(first) == tokens(again) and tokens(first) != tokens(other)
    assert len({tuple(c.token_ids) for c in first[1]}) > 1  # samples differ from each other


def test_length_and_stop_strings(engine):
    [[long]] = engine.generate(["Once upon a time"], sampling=SamplingParams(max_new_tokens=5))
    assert len(long.token_ids) <= 5
    [[sampled]] = engine.generate(
        ["Once upon a time"], sampling=SamplingParams(max_new_tokens=40, temperature=1.0, seed=1)
    )
    stop = sampled.text[3:5]
    assert stop and len(sampled.text) > 5
    [[stopped]] = engine.generate(
        ["Once upon a time"], sampling=SamplingParams(max_new_tokens=40, temperature=1.0, seed=1, stop=(stop,))
    )
    assert stopped.finish_reason == "stop" and stop not in stopped.text and sampled.text.startswith(stopped.text)


def test_a_stop_string_is_not_an_eos_when_the_pad_token_is_the_eos(tiny_model_and_tokenizer):
    """SmolLM2 pads with its EOS token: a row that a stop string ends before the rest of its batch
    must not come back ending with that padding, as if the model had ended its answer."""
    model, tokenizer = tiny_model_and_tokenizer
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.pad_token = tokenizer.eos_token
    engine = HFEngine(model, tokenizer, batch_size=4, progress=False)
    sampling = SamplingParams(max_new_tokens=30, temperature=1.0, seed=5)
    free = engine.generate(["Once upon a time"], n=4, sampling=sampling)[0]
    # a stop string that ends the first sample early while the others run on
    stop = next(
        free[0].text[i : i + 2]
        for i in range(3, len(free[0].text) - 1)
        if all(ord(ch) < 128 for ch in free[0].text[i : i + 2])
    )
    stopped = engine.generate(["Once upon a time"], n=4, sampling=dataclasses.replace(sampling, stop=(stop,)))[0]
    assert max(len(c.token_ids) for c in stopped) > len(
        stopped[0].token_ids
    )  # the others ran on: the first row was padded
    first = stopped[0]
    assert first.finish_reason == "stop" and tokenizer.eos_token_id not in first.token_ids
    assert first.token_ids == free[0].token_ids[: len(first.token_ids)] and len(first.logprobs) == len(first.token_ids)
    assert stop in tokenizer.decode(first.token_ids) and first.text == free[0].text[: free[0].text.index(stop)]
