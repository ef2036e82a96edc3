"""Frozen-feature extraction: pooling matches unpadded forward passes; the on-disk cache hits,
misses and invalidates on weights, layer, pooling and texts."""

import copy

import pytest
import torch

from llmq.models.features import extract_features, feature_layer

TEXTS = ["You are in a kitchen. > open fridge", "A much longer state with more tokens in it. > take apple", "hi"]


def single_forward(model, tokenizer, text, layer):
    ids = tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        return model(**ids, output_hidden_states=True).hidden_states[layer][0].float()


@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_pooled_features_match_unpadded_forward_passes(pooling, tiny_model_and_tokenizer):
    model, tokenizer = tiny_model_and_tokenizer
    features = extract_features(model, tokenizer, TEXTS, layer=-1, pooling=pooling, batch_size=3, progress=False)
    assert features.shape == (3, model.config.hidden_size) and features.dtype == torch.float32
    for row, text in enumerate(TEXTS):
        hidden = single_forward(model, tokenizer, text, model.config.num_hidden_layers)
        expected = hidden[-1] if pooling == "last" else hidden.mean(0)
        torch.testing.assert_close(features[row], expected, atol=1e-5, rtol=0)


def test_default_layer_is_the_middle_and_bad_layers_are_refused(tiny_model_and_tokenizer):
    model, _ = tiny_model_and_tokenizer
    layers = model.config.num_hidden_layers
    assert (
        feature_layer(model, None) == layers // 2
        and feature_layer(model, -1) == layers
        and feature_layer(model, 0) == 0
    )
    with pytest.raises(ValueError, match="outside"):
        feature_layer(model, layers + 1)


def test_the_cache_hits_misses_and_invalidates(tmp_path, tiny_model_and_tokenizer):
    model, tokenizer = tiny_model_and_tokenizer
    calls = []
    handle = model.register_forward_hook(lambda *_: calls.append(1))
    try:
        first = extract_features(model, tokenizer, TEXTS, cache_dir=tmp_path, progress=False)
        assert len(calls) == 1 and len(list(tmp_path.glob("*.safetensors"))) == 1
        again = extract_features(model, tokenizer, TEXTS, cache_dir=tmp_path, progress=False)
        assert len(calls) == 1 and torch.equal(first, again)  # hit: the backbone did not run
        extract_features(model, tokenizer, TEXTS, layer=-1, cache_dir=tmp_path, progress=False)
        extract_features(model, tokenizer, TEXTS, pooling="mean", cache_dir=tmp_path, progress=False)
        extract_features(model, tokenizer, TEXTS[:2], cache_dir=tmp_path, progress=False)
        assert len(calls) == 4 and len(list(tmp_path.glob("*.safetensors"))) == 4  # misses
    finally:
        handle.remove()
    retrained = copy.deepcopy(model)
    with torch.no_grad():
        next(retrained.parameters()).add_(0.05)
    changed = extract_features(retrained, tokenizer, TEXTS, cache_dir=tmp_path, progress=False)
    assert (
        not torch.equal(changed, first) and len(list(tmp_path.glob("*.safetensors"))) == 5
    )  # new weights: recomputed
    assert not list(tmp_path.glob("*.tmp"))


def test_image_inputs_of_a_tiny_vlm_give_features_that_depend_on_the_image(tmp_path):
    import numpy as np

    model, processor = tiny_llava()
    images = [np.random.default_rng(seed).integers(0, 255, (40, 48, 3), dtype=np.uint8) for seed in range(3)]
    texts = ["<image> screen one > tap", "<image> a longer second screen > type hello", "<image> screen one > tap"]
    features = extract_features(
        model, processor, texts, images=images, layer=-1, batch_size=2, cache_dir=tmp_path, progress=False
    )
    assert features.shape == (3, 64)
    single = processor(text=[texts[1]], images=[images[1]], return_tensors="pt")
    with torch.no_grad():
        expected = model(**single, output_hidden_states=True).hidden_states[-1][0, -1]
    torch.testing.assert_close(features[1], expected, atol=1e-5, rtol=0)
    assert not torch.allclose(features[0], features[2])  # same text, another image
    swapped = extract_features(
        model, processor, texts, images=images[::-1], layer=-1, cache_dir=tmp_path, progress=False
    )
    assert len(list(tmp_path.glob("*.safetensors"))) == 2 and torch.allclose(swapped[0], features[2])
    with pytest.raises(ValueError, match="one image per text"):
        extract_features(model, processor, texts, images=images[:2], progress=False)


def test_continuations_scored_through_the_prefix_cache_match_full_forward_passes(tmp_path, tiny_model_and_tokenizer):
    from llmq.mdp import token_logprobs
    from llmq.models.features import score_continuations

    model, tokenizer = tiny_model_and_tokenizer
    prefixes = ["Goal: eat the apple.\nYou see an apple.", "A second, longer state text with more tokens in it."]
    continuations = [["\nAction: take apple", "\nAction: eat apple", "\nAction: look"], ["\nAction: go north"]]
    prefix_features, features, logprobs = score_continuations(
        model, tokenizer, prefixes, continuations, layer=-1, batch_size=2, cache_dir=tmp_path, progress=False
    )
    assert (
        prefix_features.shape == (2, 64)
        and [f.shape for f in features] == [(3, 64), (1, 64)]
        and [len(x) for x in logprobs] == [3, 1]
    )
    for p, (prefix, options) in enumerate(zip(prefixes, continuations)):
        prefix_ids = tokenizer(prefix, add_special_tokens=False)["input_ids"]
        for c, option in enumerate(options):
            ids = torch.tensor([prefix_ids + tokenizer(option, add_special_tokens=False)["input_ids"]])
            with torch.no_grad():
                out = model(ids, output_hidden_states=True)
            logp, _ = token_logprobs(out.logits, ids)
            torch.testing.assert_close(features[p][c], out.hidden_states[-1][0, -1], atol=1e-5, rtol=0)
            torch.testing.assert_close(
                prefix_features[p], out.hidden_states[-1][0, len(prefix_ids) - 1], atol=1e-5, rtol=0
            )
            assert logprobs[p][c].item() == pytest.approx(logp[0, len(prefix_ids) :].sum().item(), abs=1e-4)
    cached = score_continuations(
        model, tokenizer, prefixes, continuations, layer=-1, cache_dir=tmp_path, progress=False
    )
    assert torch.equal(cached[0], prefix_features) and all(torch.equal(a, b) for a, b in zip(cached[2], logprobs))


@pytest.mark.parametrize("vlm", ["tiny-llava", "tiny-idefics3"])
def test_continuations_of_a_prefix_with_an_image_match_full_forward_passes_with_it(tmp_path, vlm):
    """The prefix and its image run once, its KV cache serves the continuations: features and log-likelihoods
    equal a full pass over prefix + continuation beside the image, and depend on the image."""
    import numpy as np

    from llmq.mdp import token_logprobs
    from llmq.models import load_model, load_tokenizer
    from llmq.models.features import score_continuations

    model, processor = load_model(vlm, dtype="float32").eval(), load_tokenizer(vlm)
    images = [np.random.default_rng(seed).integers(0, 255, (40, 48, 3), dtype=np.uint8) for seed in range(2)]
    prefixes = ["<image> the screen. Action:", "<image> the screen. Action:"]  # the same text, two images
    continuations = [[" take apple", " look"], [" take apple", " look"]]
    prefix_features, features, logprobs = score_continuations(
        model, processor, prefixes, continuations, images=images, layer=-1, cache_dir=tmp_path, progress=False
    )
    for p, (prefix, options) in enumerate(zip(prefixes, continuations)):
        prefix_length = processor(text=[prefix], images=[images[p]], return_tensors="pt")["input_ids"].shape[1]
        for c, option in enumerate(options):
            full = processor(text=[prefix + option], images=[images[p]], return_tensors="pt")
            with torch.no_grad():
                out = model(**full, output_hidden_states=True)
            logp, _ = token_logprobs(out.logits, full["input_ids"])
            torch.testing.assert_close(features[p][c], out.hidden_states[-1][0, -1], atol=1e-5, rtol=0)
            torch.testing.assert_close(
                prefix_features[p], out.hidden_states[-1][0, prefix_length - 1], atol=1e-5, rtol=0
            )
            assert logprobs[p][c].item() == pytest.approx(logp[0, prefix_length:].sum().item(), abs=1e-4)
    assert not torch.allclose(features[0][0], features[1][0])  # the same text beside another image
    swapped = score_continuations(  # the same texts, the images swapped: a cache miss
        model, processor, prefixes, continuations, images=images[::-1], layer=-1, cache_dir=tmp_path, progress=False
    )
    assert len(list(tmp_path.glob("*.safetensors"))) == 2 and torch.allclose(swapped[1][0], features[1])
    with pytest.raises(ValueError, match="one image per prefix"):
        score_continuations(model, processor, prefixes, continuations, images=images[:1], progress=False)


def tiny_llava():
    """The registry's tiny random LLaVA and its processor (images: 32×32, 16 patches, each one ``<image>`` token)."""
    from llmq.models import load_model, load_tokenizer

    return load_model("tiny-llava", dtype="float32").eval(), load_tokenizer("tiny-llava")


def digiq_data():
    import datasets

    rows = [
        ("Goal: eat the apple\nYou see an apple.", "take apple", 1.0, "Goal: eat the apple\n> take apple\nTaken."),
        ("Goal: open the door\nYou see a door.", "look", 0.0, "Goal: open the door\n> look\nA door."),
    ]
    return datasets.Dataset.from_list(
        [
            {
                "state": state,
                "action": action,
                "reward": reward,
                "next_state": following,
                "done": True,
                "truncated": False,
                "admissible": [action, "inventory"],
            }
            for state, action, reward, following in rows
        ]
    )


def test_digiq_features_are_read_at_the_representation_tasks_answer_position(tiny_model_and_tokenizer):
    """The critic's (state, command) feature is the hidden state where the representation fine-tuning predicts its
    yes/no answer, in the chat-templated prompt it trains on; the state's is the token before the command."""
    from llmq.methods.digiq import TransitionFeatures, actionability_rows

    model, tokenizer = tiny_model_and_tokenizer
    data = digiq_data()
    features = TransitionFeatures(model, tokenizer, data, layer=None, cache_dir=None)
    [row] = actionability_rows(data)  # the scoring step; the other ends its episode without a change
    prompt = tokenizer.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True)
    hidden = single_forward(model, tokenizer, prompt, feature_layer(model, None))
    torch.testing.assert_close(
        torch.tensor(features.action(data[0]["state"], "take apple")), hidden[-1], atol=1e-5, rtol=0
    )
    before_command = len(tokenizer(prompt.split(" take apple")[0])["input_ids"]) - 1
    torch.testing.assert_close(
        torch.tensor(features.state(data[0]["state"])), hidden[before_command], atol=1e-5, rtol=0
    )


def test_digiq_prompts_split_on_a_token_boundary_of_the_embedded_tokenizer(embedded_model_dir):
    """Prefix and continuation are tokenized apart: with SmolLM2's BPE their tokens must be the whole prompt's."""
    from transformers import AutoTokenizer

    from llmq.methods.digiq import actionability_prompts

    tokenizer = AutoTokenizer.from_pretrained(embedded_model_dir)
    commands = ["take apple", "go north", "open wooden door", "inventory"]
    prefix, continuations = actionability_prompts(tokenizer, "Goal: eat the apple\nYou see an apple.", commands)
    for continuation in continuations:
        apart = tokenizer(prefix, add_special_tokens=False)["input_ids"]
        apart += tokenizer(continuation, add_special_tokens=False)["input_ids"]
        assert apart == tokenizer(prefix + continuation, add_special_tokens=False)["input_ids"]
