"""Tiny random models for tests: built from small configs in code, seeded, no download."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models
from tokenizers.pre_tokenizers import ByteLevel
from transformers import (
    CLIPImageProcessorPil,  # the PIL backend by name: the default one warns on import when torchvision is absent
    CLIPVisionConfig,
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    Idefics3ImageProcessorPil,
    Idefics3Processor,
    Idefics3VisionConfig,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    LlamaForTokenClassification,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

# The same ChatML layout as SmolLM2's template, without its default system prompt.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# ChatML whose message contents may also be lists of parts: {"type": "image"} becomes the image placeholder.
CHATML_IMAGE_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '<image>' }}{% else %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer (256 byte tokens + ChatML specials, no merges): encodes any text."""
    vocab = {symbol: index for index, symbol in enumerate(sorted(ByteLevel.alphabet()))}
    for token in SPECIAL_TOKENS:
        vocab[token] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=SPECIAL_TOKENS,
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def _tiny_llama_config(tokenizer, **overrides) -> LlamaConfig:
    """2 layers, 64 wide, 4 heads: the language model of every tiny model."""
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **overrides,
    )


def build_tiny_llama(directory: Path, seed: int = 0, head: str = "causal_lm") -> None:
    """Write a 2-layer, 64-wide random Llama (≈90k parameters) with the byte tokenizer to ``directory``:
    a causal LM, or with ``head`` ``token_classification`` / ``sequence_classification`` a two-label
    classifier (a process reward model's shape)."""
    tokenizer = byte_tokenizer()
    config = _tiny_llama_config(tokenizer, max_position_embeddings=1024, tie_word_embeddings=True)
    if head != "causal_lm":
        config.num_labels = 2  # correct or not, as TRL's PRMTrainer labels a step
    classes = {
        "causal_lm": LlamaForCausalLM,
        "token_classification": LlamaForTokenClassification,
        "sequence_classification": LlamaForSequenceClassification,
    }
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = classes[head](config)
    if head == "causal_lm":
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def build_tiny_llava(directory: Path, seed: int = 0) -> None:
    """Write a tiny random LLaVA (a 2-layer CLIP vision tower, a 2-layer 64-wide Llama) and its processor to
    ``directory``: the byte tokenizer with an ``<image>`` token and a ChatML template that places images; images are
    resized to 32×32 and cut into 16 patches of 8×8, each one ``<image>`` token."""
    tokenizer = byte_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": [*SPECIAL_TOKENS, "<image>"]})
    tokenizer.chat_template = CHATML_IMAGE_TEMPLATE
    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8
    )
    text = _tiny_llama_config(tokenizer, max_position_embeddings=4096)  # screens are long in byte tokens
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    images = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    # "default" drops the CLS feature; the processor counts it among the additional tokens.
    processor = LlavaProcessor(
        image_processor=images,
        tokenizer=tokenizer,
        patch_size=8,
        vision_feature_select_strategy="default",
        image_token="<image>",
        num_additional_image_tokens=1,
        chat_template=CHATML_IMAGE_TEMPLATE,
    )
    model.save_pretrained(directory)
    processor.save_pretrained(directory)


# Idefics3's (SmolVLM's) image markup: a tile's position, the whole image, and the image's bounds.
IDEFICS3_IMAGE_TOKENS = [
    "<global-img>",
    *(f"<row_{row}_col_{col}>" for row in range(1, 7) for col in range(1, 7)),
    "<fake_token_around_image>",
    "<image>",
    "<end_of_utterance>",
]


def save_random_idefics3(
    directory: Path,
    tokenizer,
    vision: Idefics3VisionConfig,
    text: LlamaConfig,
    images: Idefics3ImageProcessorPil,
    *,
    scale_factor: int,
    chat_template: str,
    seed: int = 0,
) -> None:
    """Write an Idefics3 with seeded random weights and its processor to ``directory``; each tile's
    ``(image_size / patch_size)²`` patches are pixel-shuffled by ``scale_factor`` into ``image_seq_len`` tokens."""
    config = Idefics3Config(
        vision_config=vision.to_dict(),
        text_config=text.to_dict(),
        scale_factor=scale_factor,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=text.tie_word_embeddings,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = Idefics3ForConditionalGeneration(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    image_seq_len = (vision.image_size // vision.patch_size) ** 2 // scale_factor**2
    processor = Idefics3Processor(
        image_processor=images, tokenizer=tokenizer, image_seq_len=image_seq_len, chat_template=chat_template
    )
    model.save_pretrained(directory)
    processor.save_pretrained(directory)


def build_tiny_idefics3(directory: Path, seed: int = 0) -> None:
    """Write a tiny random Idefics3 (SmolVLM's architecture: a 2-layer SigLIP-style vision tower whose 32×32 tiles
    are pixel-shuffled into 4 tokens each, and a 2-layer Llama) and its processor to ``directory``: images are resized
    to a longest edge of 64 and split into 32×32 tiles plus the whole image, as SmolVLM's processor splits a screen
    into 512×512 tiles; the byte tokenizer with Idefics3's image markup tokens and the ChatML template."""
    tokenizer = byte_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": [*SPECIAL_TOKENS, *IDEFICS3_IMAGE_TOKENS]})
    vision = Idefics3VisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8
    )
    # screens are long in byte tokens
    text = _tiny_llama_config(tokenizer, max_position_embeddings=4096, tie_word_embeddings=True)
    images = Idefics3ImageProcessorPil(size={"longest_edge": 64}, max_image_size={"longest_edge": 32})
    save_random_idefics3(
        directory, tokenizer, vision, text, images, scale_factor=2, chat_template=CHATML_IMAGE_TEMPLATE, seed=seed
    )
