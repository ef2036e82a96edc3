"""Kill -9 in the middle of `llmq train`, then `llmq train --resume`: the run continues from the
newest complete checkpoint and ends exactly where an uninterrupted run with the same seed ends."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from llmq.checkpoints import is_complete, resume_point

MAX_STEPS, SAVE_STEPS, KILL_AT = 40, 2, 6
LOSS_LINE = re.compile(r"'loss': '([^']+)'")  # one per step: the Trainer prints every log (logging_steps 1)


def train_command(recipe, output_dir, *extra):
    return [sys.executable, "-m", "llmq.cli", "train", str(recipe), "--output_dir", str(output_dir), *extra]


@pytest.mark.slow
def test_kill_9_mid_run_then_resume_matches_an_uninterrupted_run(tmp_path, shiq_recipe):
    recipe = shiq_recipe(
        tmp_path,
        max_steps=MAX_STEPS,
        save_steps=SAVE_STEPS,
        logging_steps=1,
        seed=0,
        per_device_train_batch_size=4,
        learning_rate=0.01,
        beta=0.5,
        use_cpu=True,
        report_to="none",
        disable_tqdm=True,
    )
    # One thread per process: the two runs share the machine's cores without oversubscribing them
    # (unbuffered, so the killed run's printed steps are all in its output).
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    run, reference_dir = tmp_path / "run", tmp_path / "reference"
    reference = subprocess.Popen(
        train_command(recipe, reference_dir), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    killed = subprocess.Popen(
        train_command(recipe, run), env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    try:
        deadline = time.monotonic() + 300
        # Kill as soon as the save of checkpoint-6 has begun (34 of the 40 steps are still to come):
        # often the folder is still half-written, and the resume must fall back to checkpoint-4.
        while not (run / f"checkpoint-{KILL_AT}").exists() and killed.poll() is None and time.monotonic() < deadline:
            time.sleep(0.002)
        assert killed.poll() is None, "the run ended before it could be killed"
        killed.send_signal(signal.SIGKILL)
        steps_done = len(LOSS_LINE.findall(killed.communicate()[0]))
    finally:
        killed.kill()
    assert killed.returncode == -signal.SIGKILL and KILL_AT <= steps_done < MAX_STEPS

    point = resume_point(run)
    resumed_from = int(point.rsplit("-", 1)[1])
    assert resumed_from == (KILL_AT if is_complete(run / f"checkpoint-{KILL_AT}") else KILL_AT - SAVE_STEPS)
    assert steps_done - resumed_from <= SAVE_STEPS  # at most save_steps steps lost
    resumed = subprocess.run(
        train_command(recipe, run, "--resume"), env=env, capture_output=True, text=True, timeout=300
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from {point}" in resumed.stdout
    assert len(LOSS_LINE.findall(resumed.stdout)) == MAX_STEPS - resumed_from  # it went on from there, not from step 0
    assert reference.wait(timeout=300) == 0

    def losses(output_dir):
        state = json.loads((output_dir / f"checkpoint-{MAX_STEPS}" / "trainer_state.json").read_text())
        return {entry["step"]: entry["loss"] for entry in state["log_history"] if "loss" in entry}

    assert list(losses(run)) == list(range(1, MAX_STEPS + 1))
    assert losses(run) == pytest.approx(losses(reference_dir), abs=1e-6)
    final, expected = load_file(str(run / "model.safetensors")), load_file(str(reference_dir / "model.safetensors"))
    assert final.keys() == expected.keys() and all(
        torch.allclose(final[name], expected[name], atol=1e-6) for name in expected
    )
