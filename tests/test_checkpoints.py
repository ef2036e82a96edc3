"""Checkpoints: which one a run resumes from, damaged files named before any training, and a
checkpoint save that fails in the OS (file-size limit) leaving only good checkpoints behind.

Every checkpoint here is written by a real ShiQTrainer run on the tiny model, then damaged on disk
the way an interrupted save or a full disk damages it."""

import json
import os
import resource
import shutil
import signal
import subprocess
import sys

import datasets
import pytest
import torch
from conftest import SCORED_ROWS as ROWS
from peft import LoraConfig
from safetensors.torch import load_file, save_file
from transformers import TrainerCallback

from llmq.checkpoints import resume_point, validate_checkpoint
from llmq.cli import main
from llmq.errors import UserError
from llmq.models import load_model, load_tokenizer
from llmq.trainers import ShiQConfig, ShiQTrainer


def make_trainer(output_dir, peft_config=None, callbacks=None, **overrides):
    options = dict(
        output_dir=str(output_dir),
        max_steps=3,
        save_steps=1,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        logging_steps=1,
        use_cpu=True,
        seed=0,
        report_to="none",
        disable_tqdm=True,
    )
    options.update(overrides)
    return ShiQTrainer(
        model=load_model("tiny-llama", dtype="float32"),
        args=ShiQConfig(**options),
        train_dataset=datasets.Dataset.from_list(ROWS),
        processing_class=load_tokenizer("tiny-llama"),
        peft_config=peft_config,
        callbacks=callbacks,
    )


@pytest.fixture(scope="module")
def saved_run(tiny_model_dir, tmp_path_factory):
    """A 3-step run with a checkpoint after every step: checkpoint-1, -2, -3."""
    output_dir = tmp_path_factory.mktemp("run")
    make_trainer(output_dir).train()
    return output_dir


@pytest.fixture
def run(saved_run, tmp_path):
    """A private copy of ``saved_run`` to damage."""
    return shutil.copytree(saved_run, tmp_path / "run")


def truncate(path, keep=0.5):
    os.truncate(path, int(os.path.getsize(path) * keep))


def test_resume_point_is_the_newest_complete_checkpoint(run, tmp_path):
    assert resume_point(run) == str(run / "checkpoint-3")
    assert validate_checkpoint(run / "checkpoint-1") == run / "checkpoint-1"
    assert resume_point(tmp_path / "missing") is None
    (tmp_path / "fresh" / "checkpoint-notastep").mkdir(parents=True)
    assert resume_point(tmp_path / "fresh") is None


@pytest.mark.parametrize("damage", ["no trainer_state.json", "truncated trainer_state.json"])
def test_a_half_written_checkpoint_is_skipped(run, damage):
    # A kill -9 while saving checkpoint-3 leaves it without trainer_state.json (written last) or with part of it.
    newest = run / "checkpoint-3"
    truncate(newest / "model.safetensors")
    if damage == "no trainer_state.json":
        (newest / "trainer_state.json").unlink()
    else:
        truncate(newest / "trainer_state.json")
    assert resume_point(run) == str(run / "checkpoint-2")
    with pytest.raises(
        UserError,
        match=f"checkpoint {newest} is incomplete: .*; delete {newest} and resume from {run / 'checkpoint-2'}$",
    ):
        validate_checkpoint(newest)


@pytest.mark.parametrize(
    "damage, problem",
    [
        (
            "truncated",
            "is truncated or corrupt (Error while deserializing header: incomplete metadata, file not fully covered)",
        ),
        ("empty", "is truncated or corrupt (Error while deserializing header: header too small)"),
        ("garbage header", "is truncated or corrupt (Error while deserializing header:"),
    ],
)
def test_damaged_weights_name_the_file_and_the_previous_checkpoint(run, damage, problem):
    weights = run / "checkpoint-3" / "model.safetensors"
    if damage == "truncated":
        truncate(weights)
    elif damage == "empty":
        truncate(weights, keep=0)
    else:
        with open(weights, "r+b") as handle:
            handle.write(b"\xff" * 16)
    with pytest.raises(UserError) as failure:
        resume_point(run)
    message = str(failure.value)
    assert message.startswith(f"{weights} {problem}") and "\n" not in message
    assert message.endswith(f"; delete {run / 'checkpoint-3'} and resume from {run / 'checkpoint-2'}")


def test_missing_weights_and_the_oldest_checkpoint(run):
    (run / "checkpoint-1" / "model.safetensors").unlink()
    with pytest.raises(
        UserError,
        match=r"checkpoint .*checkpoint-1 has no weights \(model.safetensors, .*\); delete .*checkpoint-1 and train "
        r"from the start$",
    ):
        validate_checkpoint(run / "checkpoint-1")
    with pytest.raises(UserError, match="does not exist or is not a directory"):
        validate_checkpoint(run / "checkpoint-9")


def test_sharded_weights_are_read_shard_by_shard(run):
    folder = run / "checkpoint-3"
    (folder / "model.safetensors").unlink()
    load_model(str(run / "checkpoint-2"), dtype="float32").save_pretrained(folder, max_shard_size="100KB")
    shards = sorted(folder.glob("model-*.safetensors"))
    assert len(shards) > 1 and (folder / "model.safetensors.index.json").is_file()
    assert resume_point(run) == str(folder)
    truncate(shards[-1])
    with pytest.raises(UserError, match=f"{shards[-1]} is truncated or corrupt"):
        validate_checkpoint(folder)
    shards[-1].unlink()
    with pytest.raises(
        UserError,
        match=f"{shards[-1]}, named by model.safetensors.index.json, is missing; delete {folder} and resume from "
        f"{run / 'checkpoint-2'}",
    ):
        validate_checkpoint(folder)
    # A shard that lacks a tensor the index places in it.
    save_file({"unrelated": torch.zeros(2)}, str(shards[-1]))
    with pytest.raises(
        UserError, match=f"{shards[-1]} lacks .* tensor\\(s\\) that model.safetensors.index.json places in it"
    ):
        validate_checkpoint(folder)


def test_a_lora_checkpoint_holds_adapter_weights_only(tmp_path, tiny_model_dir):
    make_trainer(
        tmp_path, peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]), max_steps=1
    ).train()
    folder = tmp_path / "checkpoint-1"
    assert (folder / "adapter_model.safetensors").is_file() and not (folder / "model.safetensors").exists()
    assert resume_point(tmp_path) == str(folder)
    truncate(folder / "adapter_model.safetensors")
    with pytest.raises(
        UserError,
        match=f"{folder / 'adapter_model.safetensors'} is truncated or corrupt.*; delete {folder} and train from "
        "the start$",
    ):
        resume_point(tmp_path)


def test_a_deepspeed_checkpoint_is_checked_through_its_global_step_archives(run):
    # ZeRO-3 without gathered weights keeps them only in global_stepN/*.pt (torch zip archives).
    folder = run / "checkpoint-3"
    state = load_file(str(folder / "model.safetensors"))
    (folder / "model.safetensors").unlink()
    (folder / "global_step3").mkdir()
    archive = folder / "global_step3" / "mp_rank_00_model_states.pt"
    torch.save({"module": state}, archive)
    assert resume_point(run) == str(folder)
    truncate(archive, keep=0.9)
    with pytest.raises(
        UserError,
        match=f"{archive} is truncated or corrupt .*; delete {folder} and resume from {run / 'checkpoint-2'}$",
    ):
        resume_point(run)


@pytest.mark.parametrize("method", ["shiq", "dpo", "digiq"])
def test_an_explicit_damaged_checkpoint_fails_before_training(run, tmp_path, capsys, method):
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(dict(row, question_index=i // 2)) + "\n" for i, row in enumerate(ROWS)))
    truncate(run / "checkpoint-2" / "model.safetensors")
    argv = [
        "train",
        "--method",
        method,
        "--model_name_or_path",
        "tiny-llama",
        "--output_dir",
        str(tmp_path / "out"),
        "--use_cpu",
        "true",
        "--resume_from_checkpoint",
        str(run / "checkpoint-2"),
    ]
    if method != "digiq":
        argv += ["--dataset_path", str(data)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert (
        err.startswith(f"llmq train: error: {run / 'checkpoint-2' / 'model.safetensors'} is truncated or corrupt")
        and err.count("\n") == 1
    ), err
    assert not (tmp_path / "out").exists()  # nothing ran


class FileSizeLimitAfterFirstSave(TrainerCallback):
    """After the first checkpoint, files of this process may not grow past ``limit`` bytes: the OS
    fails the next checkpoint's writes with EFBIG (SIGXFSZ ignored, so the write fails instead of
    the process)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.previous = None
        self.saved_weights: dict[str, torch.Tensor] = {}

    def on_save(self, args, state, control, model=None, **kwargs):
        if self.previous is None:
            self.saved_weights = {name: p.detach().clone() for name, p in model.state_dict().items()}
            self.previous = resource.getrlimit(resource.RLIMIT_FSIZE), signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (self.limit, self.previous[0][1]))

    def restore(self) -> None:
        if self.previous is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, self.previous[0])
            signal.signal(signal.SIGXFSZ, self.previous[1])


@pytest.mark.parametrize(
    "limit, reported",
    [
        (
            100_000,
            "SafetensorError: Error while serializing: I/O error: File too large (os error 27);",
        ),  # model.safetensors (~360 kB) fails
        (
            500_000,
            "RuntimeError: [enforce fail at inline_container.cc",
        ),  # the weights fit, optimizer.pt (~740 kB, torch.save) fails
    ],
)
def test_a_checkpoint_the_os_cannot_write_is_removed_and_named(tmp_path, tiny_model_dir, limit, reported):
    file_size_limit = FileSizeLimitAfterFirstSave(limit)
    trainer = make_trainer(tmp_path, callbacks=[file_size_limit])
    try:
        with pytest.raises(UserError) as failure:
            trainer.train()
    finally:
        file_size_limit.restore()
    message = str(failure.value)
    assert message.startswith(f"could not save the checkpoint of step 2 in {tmp_path / 'checkpoint-2'} ({reported}"), (
        message
    )
    assert (
        f"the partial folder was removed and the last good checkpoint is {tmp_path / 'checkpoint-1'}" in message
        and "\n" not in message
    )
    assert not (tmp_path / "checkpoint-2").exists()
    assert resume_point(tmp_path) == str(tmp_path / "checkpoint-1")
    reloaded = load_model(str(tmp_path / "checkpoint-1"), dtype="float32").state_dict()
    assert reloaded.keys() == file_size_limit.saved_weights.keys()
    assert all(torch.equal(reloaded[name], tensor) for name, tensor in file_size_limit.saved_weights.items())
    # The run goes on from there once the disk has room.
    resumed = make_trainer(tmp_path, max_steps=2)
    resumed.train(resume_from_checkpoint=resume_point(tmp_path))
    assert [entry["step"] for entry in resumed.state.log_history if "loss" in entry] == [1, 2]
    assert resume_point(tmp_path) == str(tmp_path / "checkpoint-2")


@pytest.mark.slow
def test_llmq_train_with_a_file_size_limit_exits_2_with_one_line(tmp_path, shiq_recipe):
    recipe = shiq_recipe(
        tmp_path,
        output_dir=str(tmp_path / "out"),
        max_steps=2,
        save_steps=1,
        per_device_train_batch_size=4,
        use_cpu=True,
        report_to="none",
        disable_tqdm=True,
    )

    # In the child: files past 200 kB fail with EFBIG (an ignored signal stays ignored across exec).
    def limit_file_size():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(
        [sys.executable, "-m", "llmq.cli", "train", str(recipe)],
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=limit_file_size,
        env=env,
    )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(
        f"llmq train: error: could not save the checkpoint of step 1 in {tmp_path / 'out' / 'checkpoint-1'} "
        "(SafetensorError:"
    )
    assert last.endswith(
        "the partial folder was removed and there is no earlier checkpoint; free disk space (or raise the file size "
        "limit) and start again"
    )
    assert not (tmp_path / "out" / "checkpoint-1").exists() and resume_point(tmp_path / "out") is None
