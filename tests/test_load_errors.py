"""A model, adapter or dataset that cannot be loaded ends `llmq train | eval | generate` with one
line on stderr and exit code 2, naming what was asked for and why it failed; a valid PEFT adapter
directory still loads (its base model with the adapter, and the base model's tokenizer)."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from peft import LoraConfig, get_peft_model

from llmq.cli import main
from llmq.models import load_model, load_tokenizer

ROWS = [{"prompt": f"Q{i}: what is 1+{i}?", "completion": f" It is {1 + i}.", "reward": 1.0} for i in range(4)]


@pytest.fixture(scope="module")
def adapter_dir(tiny_model_dir, tmp_path_factory):
    """A LoRA adapter on the tiny model, saved by peft: adapter_config.json + adapter_model.safetensors, no tokenizer,
    no config.json."""
    model = get_peft_model(
        load_model("tiny-llama", dtype="float32"),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    )
    directory = tmp_path_factory.mktemp("adapter")
    model.save_pretrained(directory)
    return directory


def with_base(adapter_dir, tmp_path, base):
    """A copy of ``adapter_dir`` whose adapter_config.json names another base model."""
    copy = shutil.copytree(adapter_dir, tmp_path / "adapter")
    config = json.loads((copy / "adapter_config.json").read_text())
    (copy / "adapter_config.json").write_text(json.dumps(dict(config, base_model_name_or_path=base)))
    return copy


@pytest.mark.slow
def test_a_valid_adapter_directory_loads_its_base_model_with_the_adapter(
    adapter_dir, tiny_model_dir, data_dir, tmp_path
):
    assert sorted(path.name for path in adapter_dir.iterdir() if path.suffix != ".md") == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    model = load_model(str(adapter_dir), dtype="float32")
    base = load_model("tiny-llama", dtype="float32")
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert not torch.allclose(model(ids).logits, base(ids).logits)  # the adapter (non-zero B) is applied
    assert load_tokenizer(str(adapter_dir)).get_vocab() == load_tokenizer("tiny-llama").get_vocab()
    argv = [
        "eval",
        "--model_name_or_path",
        str(adapter_dir),
        "--limit",
        "1",
        "--max_new_tokens",
        "4",
        "--data_dir",
        str(data_dir),
        "--output_dir",
        str(tmp_path / "eval"),
    ]
    assert main(argv) == 0 and (tmp_path / "eval" / "report.json").is_file()


@pytest.mark.parametrize(
    "case, message",
    [
        (
            "empty directory",
            "model directory '{path}' has neither config.json nor adapter_config.json: it is not a saved model",
        ),
        (
            "truncated weights",
            "cannot load model '{path}': Error while deserializing header: incomplete metadata, file not fully "
            "covered",
        ),
        ("no weights", "cannot load model '{path}': Error no file named model.safetensors"),
        (
            "adapter on a missing directory",
            "adapter '{path}': its base model '/nonexistent/base' (base_model_name_or_path in adapter_config.json) "
            "is neither an existing directory nor a Hub id",
        ),
        (
            "adapter on an unreachable Hub id",
            "cannot load model '{path}' (a PEFT adapter on base model 'nobody/no-such-model'): We couldn't connect to 'https://huggingface.co'",
        ),
        (
            "broken adapter config",
            "{path}/adapter_config.json does not name the adapter's base model (JSONDecodeError:",
        ),
    ],
)
@pytest.mark.parametrize("command", ["train", "eval", "generate"])
def test_an_unloadable_model_directory_is_one_line_exit_2(
    tmp_path, capsys, monkeypatch, tiny_model_dir, adapter_dir, case, command, message
):
    monkeypatch.setattr(
        "huggingface_hub.constants.HF_HUB_OFFLINE", True
    )  # what HF_HUB_OFFLINE=1 sets at import; read at each download
    if case.startswith("adapter on"):
        path = with_base(adapter_dir, tmp_path, "/nonexistent/base" if "missing" in case else "nobody/no-such-model")
    elif case == "broken adapter config":
        path = shutil.copytree(adapter_dir, tmp_path / "adapter")
        (path / "adapter_config.json").write_text("{not json")
    else:
        path = shutil.copytree(tiny_model_dir, tmp_path / "model")
        if case == "empty directory":
            shutil.rmtree(path)
            path.mkdir()
        elif case == "truncated weights":
            os.truncate(path / "model.safetensors", os.path.getsize(path / "model.safetensors") // 2)
        else:
            (path / "model.safetensors").unlink()
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    argv = [command, "--model_name_or_path", str(path)]
    argv += {
        "train": ["--dataset_path", str(data), "--use_cpu", "true", "--output_dir", str(tmp_path / "out")],
        "eval": ["--limit", "1", "--output_dir", str(tmp_path / "out")],
        "generate": ["--limit", "1", "--dataset_path", str(tmp_path / "generated")],
    }[command]
    assert main(argv) == 2
    assert_one_line_error(capsys.readouterr().err, f"llmq {command}: error: " + message.format(path=path))


def assert_one_line_error(err, start):
    """The error is stderr's last line, alone on it; before it, at most the progress bar of a base model that did
    load."""
    assert "Traceback" not in err and err.endswith("\n"), err
    lines = err.strip().splitlines()
    assert lines[-1].startswith(start) and all("Loading weights" in line for line in lines[:-1]), err


def test_an_unknown_guide_model_is_one_line_exit_2(tmp_path, capsys, monkeypatch, tiny_model_dir, data_dir):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    argv = [
        "eval",
        "--model_name_or_path",
        "tiny-llama",
        "--decoding",
        "guided",
        "--guide_model",
        "nobody/no-such-guide",
        "--temperature",
        "0",
        "--limit",
        "1",
        "--data_dir",
        str(data_dir),
        "--output_dir",
        str(tmp_path / "out"),
    ]
    assert main(argv) == 2
    assert_one_line_error(
        capsys.readouterr().err,
        "llmq eval: error: cannot load model 'nobody/no-such-guide': We couldn't connect to 'https://huggingface.co'",
    )


@pytest.mark.slow
@pytest.mark.parametrize("data_dir_set", [True, False])
def test_a_task_with_no_local_copy_and_no_hub_is_one_line_exit_2(tmp_path, tiny_model_dir, data_dir_set):
    # Offline, with an empty Hugging Face cache: the Hub is never reached and no cached copy is found.
    env = {key: value for key, value in os.environ.items() if key != "LLMQ_DATA_DIR"} | {
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_HOME": str(tmp_path / "hf"),
        "OMP_NUM_THREADS": "1",
    }
    argv = [
        sys.executable,
        "-m",
        "llmq.cli",
        "eval",
        "--model_name_or_path",
        "tiny-llama",
        "--task",
        "gsm8k",
        "--limit",
        "1",
        "--output_dir",
        str(tmp_path / "out"),
    ]
    if data_dir_set:
        (tmp_path / "empty").mkdir()
        argv += ["--data_dir", str(tmp_path / "empty")]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    local = (
        f"no {tmp_path / 'empty' / 'gsm8k' / 'test.jsonl'}"
        if data_dir_set
        else "no local copy (gsm8k/test.jsonl under data_dir or $LLMQ_DATA_DIR, neither is set)"
    )
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(
        f"llmq eval: error: task gsm8k, split test: {local}, and the Hub dataset 'openai/gsm8k' (config main) could "
        "not be loaded (ConnectionError: "
    ), last
