"""`llmq explain`: the credit map's values are β·(log π_θ − log π_ref) of exactly the response tokens."""

import json

import pytest
import torch

from llmq.cli import main
from llmq.mdp import token_logprobs
from llmq.models import load_model, load_tokenizer


@pytest.fixture(scope="module")
def perturbed_policy_dir(tmp_path_factory, tiny_model_dir):
    model = load_model("tiny-llama", dtype="float32")
    with torch.no_grad():
        generator = torch.Generator().manual_seed(0)
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    directory = tmp_path_factory.mktemp("policy")
    model.save_pretrained(directory)
    load_tokenizer("tiny-llama").save_pretrained(directory)
    return directory


@pytest.mark.slow
def test_credit_map_values_are_beta_log_ratios_of_the_response(tmp_path, capsys, perturbed_policy_dir):
    out = tmp_path / "explain"
    argv = [
        "explain",
        "--model_name_or_path",
        str(perturbed_policy_dir),
        "--ref_model_name_or_path",
        "tiny-llama",
        "--beta",
        "0.5",
        "--prompt",
        "What is 2+3?",
        "--response",
        "It is 5.",
        "--output_dir",
        str(out),
    ]
    assert main(argv) == 0
    record = json.loads((out / "credit_map.json").read_text())
    assert "".join(record["tokens"]) == "It is 5.<|im_end|>"
    assert (out / "credit_map.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and "What is 2+3?" in (
        out / "credit_map.html"
    ).read_text()

    tokenizer = load_tokenizer("tiny-llama")
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 2+3?"}, {"role": "assistant", "content": "It is 5."}], tokenize=False
    ).rstrip()
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        policy, _ = token_logprobs(load_model(str(perturbed_policy_dir), dtype="float32")(ids).logits, ids)
        reference, _ = token_logprobs(load_model("tiny-llama", dtype="float32")(ids).logits, ids)
    expected = (0.5 * (policy - reference))[0, -len(record["values"]) :]
    assert torch.allclose(torch.tensor(record["values"]), expected, atol=1e-5)
    assert "total implicit reward" in capsys.readouterr().out


def test_explain_needs_a_prompt(capsys):
    assert main(["explain", "--model_name_or_path", "tiny-llama"]) == 2
    assert "key 'prompt' is required" in capsys.readouterr().err
