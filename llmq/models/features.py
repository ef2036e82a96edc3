"""Frozen backbone features for value heads (Digi-Q, docs/algorithms.md §5.4–5.5), computed once and cached.

Training small heads on a frozen backbone only pays off if the backbone runs once per text, not
once per epoch: :func:`extract_features` stores the pooled hidden states in a safetensors file
keyed by the backbone's weights, the layer, the pooling and the texts, and reads it back on the
next call.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm


def weights_checksum(model: torch.nn.Module) -> float:
    """Sum of every parameter in fp64: tells two sets of weights apart (a retrained model saved
    under the same name), so nothing computed from one is reused for the other."""
    with torch.no_grad():
        return float(sum(parameter.double().sum() for parameter in model.parameters()))


def _text_config(model: torch.nn.Module):
    """The language model's config (a VLM keeps it in ``text_config``)."""
    return getattr(model.config, "text_config", None) or model.config


def feature_layer(model: torch.nn.Module, layer: int | None) -> int:
    """Index into ``hidden_states`` (0 = embeddings, L = last layer); ``None`` → the middle layer.

    Digi-Q reads *intermediate* features: the middle of the network keeps more of the input than
    the last layer, which is shaped for next-token prediction.
    """
    count = _text_config(model).num_hidden_layers
    index = count // 2 if layer is None else (layer if layer >= 0 else count + 1 + layer)
    if not 0 <= index <= count:
        raise ValueError(f"layer {layer} is outside 0..{count} (or -1..-{count + 1}) for this {count}-layer model")
    return index


@torch.no_grad()
def extract_features(
    model: torch.nn.Module,
    tokenizer,
    texts: list[str],
    *,
    images: list | None = None,
    layer: int | None = None,
    pooling: Literal["last", "mean"] = "last",
    batch_size: int = 8,
    max_length: int = 1024,
    cache_dir: str | Path | None = None,
    progress: bool = True,
) -> torch.Tensor:
    """Pooled hidden states ``[len(texts), hidden]`` (fp32, on the CPU) of a causal LM or a VLM.

    Args:
        model: a HF causal LM, or a VLM (e.g. LLaVA) whose outputs carry its language model's
            ``hidden_states``; it runs in eval mode, without gradients.
        tokenizer: its tokenizer, or the VLM's processor when ``images`` are given; texts are
            encoded as they are (render chat templates first).
        texts: one string per state or (state, action) pair; with images, each holds the
            processor's image placeholder (e.g. ``<image>``).
        images: one image per text (PIL images or ``[H, W, 3]`` uint8 arrays), or ``None``.
        layer: hidden-state index (see :func:`feature_layer`); default the middle layer.
        pooling: ``last`` — the last real token (in a causal LM it has read the whole text);
            ``mean`` — the mean over real tokens.
        batch_size: texts per forward pass (right padding; the pooling skips padding).
        max_length: longer texts keep their last ``max_length`` tokens (the most recent context);
            texts with images are not truncated (their image tokens must stay whole).
        cache_dir: where to keep ``<key>.safetensors``; ``None`` disables the cache.
        progress: show a progress bar over batches.
    """
    if images is not None and len(images) != len(texts):
        raise ValueError(f"{len(images)} images for {len(texts)} texts: give one image per text")
    index = feature_layer(model, layer)
    cache_file = None
    if cache_dir is not None:
        digest = hashlib.sha256("\0".join(texts).encode())
        for image in images or []:
            pixels = np.asarray(image)
            digest.update(str(pixels.shape).encode() + pixels.tobytes())
        texts_digest = digest.hexdigest()
        key = json.dumps(
            {
                "model": type(model).__name__,
                "weights": weights_checksum(model),
                "layer": index,
                "pooling": pooling,
                "max_length": max_length,
                "texts": texts_digest,
            }
        )
        cache_file = Path(cache_dir) / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.safetensors"
        if cache_file.is_file():
            return load_file(str(cache_file))["features"]

    was_training = model.training
    model.eval()
    text_tokenizer = getattr(tokenizer, "tokenizer", tokenizer)  # a processor wraps one
    text_tokenizer.padding_side, text_tokenizer.truncation_side = "right", "left"
    device = next(model.parameters()).device
    batches = []
    for start in tqdm(range(0, len(texts), batch_size), desc="features", unit="batch", disable=not progress):
        chunk = texts[start : start + batch_size]
        if images is None:
            encoded = tokenizer(chunk, return_tensors="pt", padding=True, truncation=True, max_length=max_length).to(
                device
            )
        else:
            encoded = tokenizer(
                text=chunk, images=images[start : start + batch_size], return_tensors="pt", padding=True
            ).to(device)
        hidden = model(**encoded, output_hidden_states=True, use_cache=False).hidden_states[index].float()
        mask = encoded["attention_mask"]
        if pooling == "last":
            pooled = hidden[torch.arange(len(hidden), device=device), mask.sum(-1) - 1]
        elif pooling == "mean":
            pooled = (hidden * mask[..., None]).sum(1) / mask.sum(-1, keepdim=True)
        else:
            raise ValueError(f"pooling must be 'last' or 'mean', got {pooling!r}")
        batches.append(pooled.cpu())
    model.train(was_training)
    features = torch.cat(batches) if batches else torch.zeros(0, _text_config(model).hidden_size)
    if cache_file is not None:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        partial = cache_file.with_suffix(f".{os.getpid()}.tmp")
        save_file({"features": features.contiguous()}, str(partial))
        partial.replace(cache_file)  # atomic: a killed run never leaves a half-written cache entry
    return features


@torch.no_grad()
def score_continuations(
    model: torch.nn.Module,
    tokenizer,
    prefixes: list[str],
    continuations: list[list[str]],
    *,
    images: list | None = None,
    layer: int | None = None,
    batch_size: int = 16,
    cache_dir: str | Path | None = None,
    progress: bool = True,
) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """Features and log-likelihoods of several continuations of each prefix, the prefix run once.

    A state and its candidate actions share the state's text: the backbone reads the prefix once
    and its KV cache serves every continuation, so scoring N actions of a 400-token state costs
    about one state, not N.  Prefix and continuations are tokenized separately (no special tokens
    added), so a token never straddles the boundary.

    With ``images`` (one per prefix; ``tokenizer`` is then the VLM's processor and each prefix holds its image
    placeholder) the image is encoded once with its prefix too: a screen of many tiles costs one pass per state,
    not one per continuation.

    Returns:
        ``prefix_features`` ``[P, hidden]`` (last prefix token), and per prefix
        ``continuation_features`` ``[n_i, hidden]`` (last continuation token) and
        ``continuation_logprobs`` ``[n_i]`` (``Σ log π(continuation tokens | prefix)``); fp32, CPU.
        A prefix with no continuations gets its features only.
        The same ``cache_dir`` cache as :func:`extract_features`, keyed by all the texts.
    """
    if len(prefixes) != len(continuations):
        raise ValueError(
            f"{len(continuations)} continuation lists for {len(prefixes)} prefixes: give one list (possibly empty) "
            "per prefix"
        )
    if images is not None and len(images) != len(prefixes):
        raise ValueError(f"{len(images)} images for {len(prefixes)} prefixes: give one image per prefix")
    index = feature_layer(model, layer)
    cache_file = None
    if cache_dir is not None:
        digest = hashlib.sha256("\0".join(prefixes).encode())
        for options in continuations:
            digest.update(("\1" + "\0".join(options)).encode())
        for image in images or []:
            pixels = np.asarray(image)
            digest.update(str(pixels.shape).encode() + pixels.tobytes())
        key = json.dumps(
            {
                "kind": "continuations",
                "model": type(model).__name__,
                "weights": weights_checksum(model),
                "layer": index,
                "texts": digest.hexdigest(),
            }
        )
        cache_file = Path(cache_dir) / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.safetensors"
        if cache_file.is_file():
            stored = load_file(str(cache_file))
            sizes = stored["sizes"].tolist()
            return (
                stored["prefix_features"],
                list(stored["continuation_features"].split(sizes)),
                list(stored["continuation_logprobs"].split(sizes)),
            )

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    text_tokenizer = getattr(tokenizer, "tokenizer", tokenizer)  # a processor wraps one
    prefix_features, continuation_features, continuation_logprobs = [], [], []
    for i, (prefix, options) in enumerate(
        tqdm(list(zip(prefixes, continuations)), desc="features", unit="state", disable=not progress)
    ):
        if images is None:
            prefix_inputs = tokenizer(prefix, add_special_tokens=False, return_tensors="pt")
        else:
            prefix_inputs = tokenizer(text=[prefix], images=[images[i]], add_special_tokens=False, return_tensors="pt")
        prefix_inputs = prefix_inputs.to(device)
        prefix_ids = prefix_inputs["input_ids"]
        head = model(**prefix_inputs, output_hidden_states=True, use_cache=True)
        prefix_features.append(head.hidden_states[index][0, -1].float().cpu())
        first_logp = torch.log_softmax(head.logits[0, -1].float(), dim=-1)
        cache_key = "cache" if hasattr(head, "cache") else "past_key_values"
        features, logprobs = [], []
        for start in range(0, len(options), batch_size):
            encoded = [
                text_tokenizer(text, add_special_tokens=False)["input_ids"]
                for text in options[start : start + batch_size]
            ]
            if any(not ids for ids in encoded):
                raise ValueError(f"an empty continuation of prefix {prefix[:60]!r}")
            width, count = max(len(ids) for ids in encoded), len(encoded)
            ids = torch.full((count, width), text_tokenizer.pad_token_id, dtype=torch.long)
            real = torch.zeros((count, width), dtype=torch.long)
            for row, tokens in enumerate(encoded):
                ids[row, : len(tokens)], real[row, : len(tokens)] = torch.tensor(tokens), 1
            ids, real = ids.to(device), real.to(device)
            cache = copy.deepcopy(getattr(head, cache_key))
            cache.batch_repeat_interleave(count)
            mask = torch.cat([torch.ones(count, prefix_ids.shape[1], dtype=torch.long, device=device), real], dim=1)
            positions = prefix_ids.shape[1] + torch.arange(width, device=device).expand(count, -1)
            out = model(
                input_ids=ids,
                attention_mask=mask,
                position_ids=positions,
                output_hidden_states=True,
                use_cache=True,
                **{cache_key: cache},
            )
            last = real.sum(-1) - 1
            features.append(out.hidden_states[index][torch.arange(count, device=device), last].float().cpu())
            # Token 0 is scored by the prefix's last logits, token t > 0 by the continuation's row t − 1.
            step_logp = torch.log_softmax(out.logits[:, :-1].float(), dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
            totals = first_logp[ids[:, 0]] + (step_logp * real[:, 1:]).sum(-1)
            logprobs.append(totals.cpu())
        continuation_features.append(torch.cat(features) if features else torch.zeros(0, prefix_features[-1].shape[0]))
        continuation_logprobs.append(torch.cat(logprobs) if logprobs else torch.zeros(0))
    model.train(was_training)
    result = (torch.stack(prefix_features), continuation_features, continuation_logprobs)
    if cache_file is not None:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        partial = cache_file.with_suffix(f".{os.getpid()}.tmp")
        sizes = torch.tensor([len(options) for options in continuations])
        save_file(
            {
                "prefix_features": result[0].contiguous(),
                "continuation_features": torch.cat(continuation_features).contiguous(),
                "continuation_logprobs": torch.cat(continuation_logprobs).contiguous(),
                "sizes": sizes,
            },
            str(partial),
        )
        partial.replace(cache_file)
    return result
