"""Kill -9 in the middle of an online run (sampling, training or saving a round), then `llmq train --resume`: the
run continues after the last finished round with the same buffer and RNG state, and its rounds after the resume
equal an uninterrupted run's. The same for TRL's GRPO run by `method: grpo`, the bench's peer."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from llmq.checkpoints import complete_checkpoints

ROUNDS, KILL_AFTER = 6, 2
TIMING = {"round_s", "sampling_s", "update_s", "wall_s"}  # the only fields that may differ


def train_command(recipe, output_dir, *extra):
    return [sys.executable, "-m", "llmq.cli", "train", str(recipe), "--output_dir", str(output_dir), *extra]


def killed_and_resumed(recipe, tmp_path, steps_per_round: int = 1):
    """Runs ``recipe`` twice at once, SIGKILLs one as soon as round KILL_AFTER's checkpoint has begun (often
    half-written, so the resume falls back to the round before), resumes it; returns the round it resumed
    after, the resumed run's output and both runs' round logs (resumed, uninterrupted)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    run, reference_dir = tmp_path / "run", tmp_path / "reference"
    reference = subprocess.Popen(
        train_command(recipe, reference_dir), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    killed = subprocess.Popen(
        train_command(recipe, run), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 900  # a loaded machine is slow; the kill comes when the file appears
        checkpoint = run / f"checkpoint-{KILL_AFTER * steps_per_round}"
        while not checkpoint.exists() and killed.poll() is None and time.monotonic() < deadline:
            time.sleep(0.002)
        assert killed.poll() is None, "the run ended before it could be killed"
        killed.send_signal(signal.SIGKILL)
        killed.wait()
    finally:
        killed.kill()
    finished = complete_checkpoints(run)
    resumed_after = int(finished[0].name.rsplit("-", 1)[1]) // steps_per_round if finished else 0
    assert resumed_after in (KILL_AFTER - 1, KILL_AFTER)

    resumed = subprocess.run(
        train_command(recipe, run, "--resume"), env=env, capture_output=True, text=True, timeout=900
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert reference.wait(timeout=900) == 0
    ours, theirs = (json.loads((d / "summary.json").read_text())["rounds"] for d in (run, reference_dir))
    return resumed_after, resumed.stdout, ours, theirs


def assert_same_rounds(ours: list[dict], theirs: list[dict], rounds: int, after: int) -> None:
    """Both logs have rounds 0..rounds, and every logged value but the timings matches after round ``after``."""
    assert [entry["round"] for entry in ours] == [entry["round"] for entry in theirs] == list(range(rounds + 1))
    for mine, expected in zip(ours[after + 1 :], theirs[after + 1 :]):
        assert mine.keys() == expected.keys()
        for key in mine.keys() - TIMING:
            assert mine[key] == pytest.approx(expected[key], abs=1e-6), (mine["round"], key)


@pytest.mark.slow
def test_kill_9_mid_round_then_resume_matches_an_uninterrupted_run(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        "model_name_or_path: tiny-llama\nmethod: online\ntask: products_3x1digit\nobjective: shiq\n"
        f"rounds: {ROUNDS}\nprompts_per_round: 4\ncompletions_per_prompt: 2\nupdates_per_round: 2\n"
        "per_device_train_batch_size: 4\nreplay_fraction: 0.5\nbuffer_capacity: 24\nmax_new_tokens: 8\n"
        "eval_limit: 6\neval_every: 2\nlearning_rate: 1.0e-3\nbeta: 0.5\nseed: 0\nuse_cpu: true\nreport_to: none\n"
        "disable_tqdm: true\n"
    )
    resumed_after, output, ours, theirs = killed_and_resumed(recipe, tmp_path)
    assert f"resuming after round {resumed_after}" in output
    assert output.count("round ") >= ROUNDS - resumed_after
    assert_same_rounds(ours, theirs, ROUNDS, resumed_after)
    final = load_file(str(tmp_path / "run" / "model.safetensors"))
    expected = load_file(str(tmp_path / "reference" / "model.safetensors"))
    assert final.keys() == expected.keys() and all(
        torch.allclose(final[name], expected[name], atol=1e-6) for name in expected
    )


@pytest.mark.slow
def test_grpo_killed_while_saving_round_2_resumes_and_logs_what_an_uninterrupted_run_logs(tmp_path):
    steps_per_round, rounds = 2, 3
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        "model_name_or_path: tiny-llama\nmethod: grpo\ntask: products_3x1digit\n"
        f"max_steps: {steps_per_round * rounds}\nsteps_per_generation: {steps_per_round}\n"
        f"save_steps: {steps_per_round}\n"
        "num_generations: 2\nper_device_train_batch_size: 4\nmax_completion_length: 8\neval_limit: 6\n"
        "learning_rate: 1.0e-3\nseed: 0\nuse_cpu: true\nreport_to: none\ndisable_tqdm: true\n"
    )
    _, _, ours, theirs = killed_and_resumed(recipe, tmp_path, steps_per_round)
    assert_same_rounds(ours, theirs, rounds, after=0)  # the rounds before the kill come from the checkpoint's log
