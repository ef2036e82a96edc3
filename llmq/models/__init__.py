"""Model registry and loading."""

from llmq.models.registry import (
    EMBEDDED_MODEL,
    REGISTRY,
    cache_dir,
    check_model_reference,
    load_from_config,
    load_model,
    load_tokenizer,
    prepare_model,
    resolve_dtype,
    resolve_model,
)

__all__ = [
    "EMBEDDED_MODEL",
    "REGISTRY",
    "cache_dir",
    "check_model_reference",
    "load_from_config",
    "load_model",
    "load_tokenizer",
    "prepare_model",
    "resolve_dtype",
    "resolve_model",
]
