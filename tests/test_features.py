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
    assert feature_layer(model, None) == layers // 2 and feature_layer(model, -1) == layers and feature_layer(model, 0) == 0
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
    assert not torch.equal(changed, first) and len(list(tmp_path.glob("*.safetensors"))) == 5  # new weights: recomputed
    assert not list(tmp_path.glob("*.tmp"))


def test_image_inputs_of_a_tiny_vlm_give_features_that_depend_on_the_image(tmp_path):
    import numpy as np

    from llmq.models.tiny import tiny_llava

    model, processor = tiny_llava()
    images = [np.random.default_rng(seed).integers(0, 255, (40, 48, 3), dtype=np.uint8) for seed in range(3)]
    texts = ["<image> screen one > tap", "<image> a longer second screen > type hello", "<image> screen one > tap"]
    features = extract_features(model, processor, texts, images=images, layer=-1, batch_size=2, cache_dir=tmp_path, progress=False)
    assert features.shape == (3, 64)
    single = processor(text=[texts[1]], images=[images[1]], return_tensors="pt")
    with torch.no_grad():
        expected = model(**single, output_hidden_states=True).hidden_states[-1][0, -1]
    torch.testing.assert_close(features[1], expected, atol=1e-5, rtol=0)
    assert not torch.allclose(features[0], features[2])  # same text, another image
    swapped = extract_features(model, processor, texts, images=images[::-1], layer=-1, cache_dir=tmp_path, progress=False)
    assert len(list(tmp_path.glob("*.safetensors"))) == 2 and torch.allclose(swapped[0], features[2])
    with pytest.raises(ValueError, match="one image per text"):
        extract_features(model, processor, texts, images=images[:2], progress=False)
