"""Digi-Q on image observations: TextWorld states shown to a vision-language model as a rendering of the game's screen
(the current observation) beside the text of the goal and previous actions; tiny random LLaVA and Idefics3 (SmolVLM's
architecture, whose processor splits a screen into tiles) end to end."""

import json

import datasets
import pytest
import torch

pytest.importorskip("textworld", reason="TextWorld is not installed (the agents extra: pip install 'llmq[agents]')")

from llmq.cli import main  # noqa: E402
from llmq.envs.textworld import (  # noqa: E402
    command_logprobs,
    policy_prompt,
    render_state,
    screen_image,
    screen_text,
)
from llmq.models import load_model, load_tokenizer  # noqa: E402

STATES = [
    render_state("eat the apple", [], "A kitchen. An apple lies on the table."),
    render_state("eat the apple", [], "A kitchen. The table is empty."),  # the same text beside another screen
]
ADMISSIBLE = [["take apple", "eat apple", "look"], ["look", "inventory"]]


VLMS = {"tiny-llava": "LlavaForConditionalGeneration", "tiny-idefics3": "Idefics3ForConditionalGeneration"}


@pytest.fixture(scope="module", params=list(VLMS))
def tiny_vlm(request):
    return load_model(request.param, dtype="float32"), load_tokenizer(request.param)


def test_the_screen_shows_the_observation_and_the_text_the_rest(tiny_vlm):
    text, image = screen_text(STATES[0]), screen_image(STATES[0])
    assert "eat the apple" in text and "apple lies" not in text and image.size == (448, 336)
    assert screen_text(STATES[1]) == text and screen_image(STATES[1]).tobytes() != image.tobytes()


def test_screen_command_scores_are_the_reply_log_likelihoods_beside_the_screen(tiny_vlm):
    model, processor = tiny_vlm
    scores = command_logprobs(model, processor, STATES, ADMISSIBLE, batch_size=2, screens=True)
    image = screen_image(STATES[0])
    prompt = processor.apply_chat_template(
        policy_prompt(STATES[0], ADMISSIBLE[0], screens=True), tokenize=False, add_generation_prompt=True
    )
    prompt_length = processor(text=[prompt], images=[image], return_tensors="pt")["input_ids"].shape[1]
    encoded = processor(
        text=[prompt + "eat apple" + processor.tokenizer.eos_token], images=[image], return_tensors="pt"
    )
    with torch.no_grad():
        logp = torch.log_softmax(model(**encoded).logits[0, :-1], -1)
    ids = encoded["input_ids"][0]
    expected = sum(logp[t - 1, ids[t]].item() for t in range(prompt_length, len(ids)))
    assert scores[0][1] == pytest.approx(expected, abs=1e-4)
    # the same text beside another screen: the same tokens, so any change comes from the image (the tiny models'
    # 32×32 views of two text screens differ little, hence no tolerance)
    other = command_logprobs(model, processor, [STATES[1]], [ADMISSIBLE[0]], screens=True)
    assert all(a != b for a, b in zip(other[0], scores[0]))


@pytest.mark.slow
@pytest.mark.parametrize("vlm", list(VLMS))
def test_llmq_train_digiq_runs_end_to_end_on_screens_with_a_vlm(tmp_path, vlm):
    out = tmp_path / "digiq"
    argv = ["train", "--method", "digiq", "--model_name_or_path", vlm, "--observations", "screen"]
    argv += ["--output_dir", str(out), "--games_dir", str(tmp_path / "games"), "--train_games", "2"]
    argv += ["--test_games", "1", "--episode_steps", "3", "--episodes_per_game", "1", "--critic_steps", "10"]
    argv += ["--critic_batch_size", "4", "--critic_hidden_size", "16", "--threshold", "-1000", "--max_steps", "2"]
    argv += ["--per_device_train_batch_size", "2", "--learning_rate", "1e-3", "--max_length", "4096"]
    argv += ["--report_to", "none", "--save_strategy", "no", "--use_cpu", "true"]
    assert main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["observations"] == "screen" and summary["actor"]["train_loss"] > 0
    extracted = datasets.load_from_disk(str(out / "extracted"))
    assert len(extracted) == summary["extraction"]["kept"] and extracted[0]["images"][0].size == (448, 336)
    assert extracted[0]["prompt"][-1]["content"][0] == {"type": "image", "text": None}
    # the critic's features came from the VLM with the screens, each state's screen read once for all its commands
    assert len(list((out / "features").glob("*.safetensors"))) == 1
    trained, initial = load_model(str(out), dtype="float32"), load_model(vlm, dtype="float32")
    assert type(trained).__name__ == VLMS[vlm]
    assert any(not torch.equal(a, b) for a, b in zip(trained.parameters(), initial.parameters()))


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--model_name_or_path", "tiny-llama"], "model 'tiny-llama' reads no images"),
        (["--model_name_or_path", "tiny-llava", "--representation_steps", "5"], "set representation_steps: 0"),
    ],
)
def test_screens_need_a_vlm_and_no_representation_stage(tmp_path, capsys, extra, message):
    argv = ["train", "--method", "digiq", "--observations", "screen", "--output_dir", str(tmp_path), *extra]
    argv += ["--games_dir", str(tmp_path / "games"), "--train_games", "1", "--test_games", "1", "--use_cpu", "true"]
    assert main(argv) == 2
    assert message in capsys.readouterr().err
