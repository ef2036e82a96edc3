"""Real multi-process training: ShiQ on the tiny model in 2 CPU processes (gloo) under DDP, DeepSpeed
ZeRO-2 and ZeRO-3, launched by ``llmq train --accelerate_config P --num_processes 2``, against one
process with the same global batch; then ``--resume`` from the multi-process checkpoint."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

from llmq.checkpoints import validate_checkpoint
from llmq.cli import main
from llmq.launch import PRESETS_DIR, LaunchConfig, is_launched_process, preset_names
from llmq.models import load_model

STEPS, RESUMED_STEPS = 4, 6
# Observed differences are below 1e-5 (the two runs reduce the same sums in another order).
LOSS_RTOL = 1e-4
WEIGHT_ATOL = 1e-4


@pytest.fixture(scope="module")
def recipe(tmp_path_factory, tiny_model_dir):
    folder = tmp_path_factory.mktemp("distributed")
    # Completions of equal length: each process's mean over action tokens is then the global mean's share.
    # A constant learning rate: the first steps of a 4-step and a 6-step run are the same.
    rows = [
        {
            "prompt": f"Question {i}: what is {i} + {i}?",
            "completion": f" The answer is {2 * i:03d}.",
            "reward": float(i % 3 == 0),
        }
        for i in range(16)
    ]
    (folder / "data.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    path = folder / "recipe.yaml"
    path.write_text(
        f"# llmq train {path} --accelerate_config zero2 --num_processes 2\n"
        f"model_name_or_path: tiny-llama\ndataset_path: {folder / 'data.jsonl'}\nmax_steps: {STEPS}\nlearning_rate: "
        "0.01\nlr_scheduler_type: constant\nbeta: 0.5\n"
        "save_strategy: steps\nsave_steps: 2\nlogging_steps: 1\nseed: 0\nreport_to: none\n"
    )
    return path


def logged_losses(checkpoint) -> list[float]:
    history = json.loads((checkpoint / "trainer_state.json").read_text())["log_history"]
    return [entry["loss"] for entry in history if "loss" in entry]


def logged_trainer_metrics(checkpoint) -> list[dict[str, float]]:
    """The ShiQ trainer's own metrics of every logged step (not the Trainer's loss, learning rate or timing)."""
    history = json.loads((checkpoint / "trainer_state.json").read_text())["log_history"]
    own = lambda key: "/" in key  # noqa: E731  (ShiQ's metrics are grouped: "rewards/mean", "shiq/...")
    return [{key: value for key, value in entry.items() if own(key)} for entry in history if "loss" in entry]


@pytest.fixture(scope="module")
def single_process(recipe, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("single") / "out"
    argv = [
        "train",
        str(recipe),
        "--per_device_train_batch_size",
        "4",
        "--max_steps",
        str(RESUMED_STEPS),
        "--output_dir",
        str(output_dir),
    ]
    assert main(argv) == 0
    return output_dir


def test_presets_are_shipped_and_resolved_by_name(tmp_path):
    assert {"ddp", "zero2", "zero3", "zero2_offload", "zero3_offload"} <= set(preset_names())
    assert LaunchConfig(accelerate_config="zero3").config_file().name == "zero3.yaml"
    assert LaunchConfig(num_processes=2).config_file().name == "ddp.yaml"
    own = tmp_path / "mine.yaml"
    own.write_text("distributed_type: MULTI_GPU\n")
    assert LaunchConfig(accelerate_config=str(own)).config_file() == own


def test_a_config_files_launch_settings_apply_unless_a_key_overrides_them(tmp_path):
    own = tmp_path / "two_machines.yaml"
    own.write_text(
        "distributed_type: MULTI_GPU\nnum_processes: 4\nnum_machines: 2\nmachine_rank: 1\n"
        "main_process_ip: 10.0.0.1\nmain_process_port: 29400\n"
    )
    from_file = LaunchConfig(accelerate_config=str(own))
    assert (from_file.num_processes, from_file.num_machines, from_file.machine_rank) == (4, 2, 1)
    assert (from_file.main_process_ip, from_file.main_process_port) == ("10.0.0.1", 29400) and from_file.distributed
    overridden = LaunchConfig(accelerate_config=str(own), num_processes=8, machine_rank=0)
    assert (overridden.num_processes, overridden.machine_rank) == (8, 0)
    assert LaunchConfig(accelerate_config="ddp").num_processes == 2  # the preset's, no longer 1
    assert LaunchConfig().num_processes == 1 and not LaunchConfig().distributed


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--accelerate_config", "zero5"], "'zero5' is neither a preset"),
        (["--num_processes", "0"], "'num_processes' must be at least 1"),
        (["--num_machines", "2", "--num_processes", "2"], "every machine needs machine 0's address and port"),
        (["--num_machines", "2", "--machine_rank", "2", "--num_processes", "2"], "rank 2 of 2 machines"),
        (["--num_machines", "2", "--num_processes", "3"], "does not split evenly over 2 machines"),
    ],
)
def test_bad_launch_keys_are_one_line_errors(recipe, capsys, argv, message):
    assert main(["train", str(recipe), *argv]) == 2
    assert message in capsys.readouterr().err


def test_a_config_files_deepspeed_file_is_read_relative_to_it(recipe, capsys, tmp_path):
    assert (PRESETS_DIR / "zero3.json").is_file()  # the preset's own, named relatively
    own = tmp_path / "mine.yaml"
    own.write_text("distributed_type: DEEPSPEED\ndeepspeed_config:\n  deepspeed_config_file: mine.json\n")
    assert main(["train", str(recipe), "--accelerate_config", str(own), "--num_processes", "2"]) == 2
    assert f"key 'deepspeed_config_file' of {own}: {tmp_path / 'mine.json'} is not a file" in capsys.readouterr().err
    assert not is_launched_process()  # the refusal leaves this process as it was


ZERO3_OPTIMIZER = """
import torch, deepspeed
from llmq.launch import share_fp32_master_weights
share_fp32_master_weights()
deepspeed.init_distributed(dist_backend="gloo")
model = torch.nn.Linear(256, 256)
config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}}
config["zero_allow_untested_optimizer"] = True
_, optimizer, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters()), config=config)
print(optimizer.fp32_partitioned_groups_flat[0].data_ptr() == optimizer.fp16_partitioned_groups_flat[0].data_ptr())
"""


def test_zero3_optimizer_of_an_fp32_model_updates_the_parameter_shard_itself_instead_of_an_fp32_copy():
    if importlib.util.find_spec("deepspeed") is None:
        pytest.skip("deepspeed is not installed (extra 'deepspeed')")
    from llmq.launch import _free_port

    rank = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}
    environment = os.environ | rank | {"MASTER_PORT": str(_free_port())}
    finished = subprocess.run(
        [sys.executable, "-c", ZERO3_OPTIMIZER], capture_output=True, text=True, env=environment, timeout=300
    )
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert finished.stdout.split()[-1] == "True"  # the master weights are the shard: no second fp32 copy


GLOO_COLLECTIVES = """
import torch, deepspeed
from deepspeed import comm
from llmq.launch import gather_and_scatter_in_place_over_gloo
deepspeed.init_distributed(dist_backend="gloo")
rank = comm.get_rank()
shard = torch.arange(15.0).view(3, 5) + 100 * rank
gradient = torch.arange(16.0).view(8, 2) * (rank + 1)
torch_gathered, torch_reduced = torch.empty(6, 5), torch.empty(4, 2)
comm.allgather_fn(torch_gathered, shard)
comm.reduce_scatter_fn(torch_reduced, gradient.clone())
gather_and_scatter_in_place_over_gloo()
gathered, gathered_async, reduced = torch.empty(6, 5), torch.empty(6, 5), torch.empty(4, 2)
comm.allgather_fn(gathered, shard)
comm.allgather_fn(gathered_async, shard, async_op=True).wait()
comm.reduce_scatter_fn(reduced, gradient.clone())
in_place = gradient.clone().view(-1)
comm.reduce_scatter_fn(in_place.chunk(2)[rank], in_place)  # as ZeRO-3 calls it: the output is the input's chunk
same = [
    torch.equal(gathered, torch_gathered),
    torch.equal(gathered_async, torch_gathered),
    torch.equal(reduced, torch_reduced),
    torch.equal(in_place.chunk(2)[rank].view(4, 2), torch_reduced),
]
print(rank, all(same), same, flush=True)
torch.distributed.barrier()
torch.distributed.destroy_process_group()
"""


def test_gloo_gathers_and_reduce_scatters_in_place_give_torchs_results():
    if importlib.util.find_spec("deepspeed") is None:
        pytest.skip("deepspeed is not installed (extra 'deepspeed')")
    from llmq.launch import _free_port

    common = os.environ | {"WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", GLOO_COLLECTIVES],
            env=common | {"RANK": str(rank), "LOCAL_RANK": str(rank)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in range(2)
    ]
    for rank, process in enumerate(processes):
        stdout, stderr = process.communicate(timeout=300)
        assert process.returncode == 0, stderr[-3000:]
        assert stdout.splitlines()[-1].split()[:2] == [str(rank), "True"], stdout


ZERO3_SAVE = """
import json, sys
from pathlib import Path
import torch, deepspeed
from transformers import AutoModelForCausalLM
from transformers.integrations import HfDeepSpeedConfig
from transformers.integrations.deepspeed import unset_hf_deepspeed_config
from llmq.checkpoints import save_partitioned_weights
from llmq.models.tiny import build_tiny_llama
deepspeed.init_distributed(dist_backend="gloo")
folder = Path(sys.argv[1])
build_tiny_llama(folder / "base")
zero3 = HfDeepSpeedConfig({"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}})
model = AutoModelForCausalLM.from_pretrained(folder / "base", dtype=torch.float32)  # built partitioned
partitioned = all(p.numel() == 0 for p in model.parameters())
model.model.register_buffer("step_count", torch.tensor([3.0]))  # a persistent buffer is saved with the weights
files = save_partitioned_weights(model, folder / "saved", write=True, max_shard_bytes=40_000)
model.config.save_pretrained(folder / "saved")
unset_hf_deepspeed_config()
base = dict(AutoModelForCausalLM.from_pretrained(folder / "base", dtype=torch.float32).named_parameters())
reloaded = AutoModelForCausalLM.from_pretrained(folder / "saved", dtype=torch.float32)
index = json.loads((folder / "saved" / "model.safetensors.index.json").read_text())
print(json.dumps({
    "partitioned": partitioned,
    "files": files,
    "indexed_files": sorted(set(index["weight_map"].values())),
    "indexed_tensors": sorted(index["weight_map"]),
    "names": sorted(n for n, _ in reloaded.named_parameters()) == sorted(base),
    "equal": all(torch.equal(p, base[n]) for n, p in reloaded.named_parameters()),
    "tied": reloaded.lm_head.weight.data_ptr() == reloaded.model.embed_tokens.weight.data_ptr(),
}))
"""


def test_a_partitioned_model_is_saved_shard_by_shard_and_reloads_with_the_same_weights(tmp_path):
    if importlib.util.find_spec("deepspeed") is None:
        pytest.skip("deepspeed is not installed (extra 'deepspeed')")
    from llmq.launch import _free_port

    rank = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}
    environment = os.environ | rank | {"MASTER_PORT": str(_free_port())}
    finished = subprocess.run(
        [sys.executable, "-c", ZERO3_SAVE, str(tmp_path)], capture_output=True, text=True, env=environment, timeout=300
    )
    assert finished.returncode == 0, finished.stderr[-3000:]
    saved = json.loads(finished.stdout.strip().splitlines()[-1])
    # The ≈90k fp32 parameters in shards of at most 40 kB, one tensor larger than that alone: several files, all
    # indexed, every parameter once (the tied LM head under the embedding's name, as save_pretrained writes it).
    assert len(saved["files"]) > 2 and saved["indexed_files"] == sorted(saved["files"])
    assert "lm_head.weight" not in saved["indexed_tensors"] and "model.embed_tokens.weight" in saved["indexed_tensors"]
    assert "model.step_count" in saved["indexed_tensors"]
    assert saved["partitioned"] and saved["names"] and saved["equal"] and saved["tied"]


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["ddp", "zero2", "zero3"])
def test_two_processes_match_one_process_with_the_same_global_batch(preset, recipe, single_process, tmp_path):
    if preset.startswith("zero") and importlib.util.find_spec("deepspeed") is None:
        pytest.skip("deepspeed is not installed (extra 'deepspeed')")
    output_dir = tmp_path / "out"
    command = [
        sys.executable,
        "-m",
        "llmq.cli",
        "train",
        str(recipe),
        "--accelerate_config",
        preset,
        "--num_processes",
        "2",
    ]
    command += ["--per_device_train_batch_size", "2", "--output_dir", str(output_dir)]
    finished = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert finished.returncode == 0, finished.stderr[-3000:]

    # Two processes really trained: each step consumed 2 × 2 of the 16 rows.
    checkpoint = output_dir / f"checkpoint-{STEPS}"
    history = json.loads((checkpoint / "trainer_state.json").read_text())["log_history"]
    assert history[0]["epoch"] == pytest.approx(4 / 16)
    assert logged_losses(checkpoint) == pytest.approx(
        logged_losses(single_process / f"checkpoint-{STEPS}"), rel=LOSS_RTOL
    )
    # The trainer's metrics are gathered over both processes: each step's equal the one process's over the same rows.
    metrics, single_metrics = (
        logged_trainer_metrics(checkpoint),
        logged_trainer_metrics(single_process / f"checkpoint-{STEPS}"),
    )
    assert (
        metrics
        and all(entry for entry in metrics)
        and [sorted(m) for m in metrics] == [sorted(m) for m in single_metrics]
    )
    for entry, single_entry in zip(metrics, single_metrics):
        assert entry == pytest.approx(single_entry, rel=LOSS_RTOL, abs=1e-6)
    assert (output_dir / "checkpoint-2" / "trainer_state.json").is_file()
    assert validate_checkpoint(checkpoint) == checkpoint  # DeepSpeed's own layout (global_step folders) included
    train = json.loads((output_dir / "summary.json").read_text())["train"]
    assert train["train_loss"] > 0
    assert 0.2 < train["peak_host_memory_gib"] < 64  # the largest training process's resident peak, in GiB
    # Under ZeRO-3 each process builds its model partitioned: it never holds all the weights (only parameters below
    # DeepSpeed's persistence threshold, the norms, are whole on both), under DDP and ZeRO-2 it holds them all.
    if preset == "zero3":
        assert 0.5 <= train["weights_held_at_load"] < 0.6
    else:
        assert train["weights_held_at_load"] == 1.0

    # The saved model (gathered from the shards under ZeRO-3) reloads in this one process.
    distributed, single = (
        load_model(str(output_dir), dtype="float32"),
        load_model(str(single_process / f"checkpoint-{STEPS}"), dtype="float32"),
    )
    for (name, weight), other in zip(distributed.named_parameters(), single.parameters()):
        assert torch.allclose(weight, other, atol=WEIGHT_ATOL), name

    # Resumed in 2 processes from the 2-process checkpoint, the run goes on as the single process did.
    finished = subprocess.run(
        [*command, "--resume", "--max_steps", str(RESUMED_STEPS)], capture_output=True, text=True, timeout=900
    )
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert f"resuming from {checkpoint}" in finished.stdout
    resumed = logged_losses(output_dir / f"checkpoint-{RESUMED_STEPS}")
    assert len(resumed) == RESUMED_STEPS
    assert resumed == pytest.approx(logged_losses(single_process / f"checkpoint-{RESUMED_STEPS}"), rel=LOSS_RTOL)


@pytest.mark.slow
def test_two_machines_on_one_host_match_one_process(recipe, single_process, tmp_path):
    """Two launches, as on two machines without a shared disk (ranks 0 and 1, machine 0's loopback address, gloo), one
    process each: the same losses as one process with the same global batch; machine 0 writes the checkpoints and
    the summary, machine 1 neither."""
    from llmq.launch import _free_port

    command = [sys.executable, "-m", "llmq.cli", "train", str(recipe), "--accelerate_config", "ddp"]
    command += ["--num_processes", "2", "--num_machines", "2", "--main_process_ip", "127.0.0.1"]
    command += ["--main_process_port", str(_free_port()), "--per_device_train_batch_size", "2"]
    machines, logs = [], []
    for rank in (0, 1):
        logs.append(tmp_path / f"machine{rank}.log")
        with open(logs[-1], "w") as log:
            argv = [*command, "--machine_rank", str(rank), "--output_dir", str(tmp_path / f"out{rank}")]
            machines.append(subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT))
    for machine, log in zip(machines, logs):
        assert machine.wait(timeout=900) == 0, log.read_text()[-3000:]
    assert "machine 1: its training processes finished" in logs[1].read_text()
    checkpoint = tmp_path / "out0" / f"checkpoint-{STEPS}"
    history = json.loads((checkpoint / "trainer_state.json").read_text())["log_history"]
    assert history[0]["epoch"] == pytest.approx(4 / 16)  # each step took 2 rows on each machine
    assert logged_losses(checkpoint) == pytest.approx(
        logged_losses(single_process / f"checkpoint-{STEPS}"), rel=LOSS_RTOL
    )
    assert json.loads((tmp_path / "out0" / "summary.json").read_text())["train"]["train_loss"] > 0
    assert (
        not list((tmp_path / "out1").rglob("trainer_state.json")) and not (tmp_path / "out1" / "summary.json").exists()
    )


def test_a_machine_whose_peer_never_joins_fails_with_one_line_and_leaves_no_process(recipe, tmp_path):
    """Rank 0 of two machines, alone: after the rendezvous timeout one line names where it waited, exit 2."""
    import psutil

    from llmq.launch import _free_port

    port = _free_port()
    output_dir = tmp_path / "alone"
    command = [sys.executable, "-m", "llmq.cli", "train", str(recipe), "--accelerate_config", "ddp"]
    command += ["--num_processes", "2", "--num_machines", "2", "--machine_rank", "0", "--main_process_ip"]
    command += ["127.0.0.1", "--main_process_port", str(port), "--rendezvous_timeout", "10"]
    command += ["--output_dir", str(output_dir)]
    finished = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 2
    assert f"meeting at 127.0.0.1:{port}) failed: Timed out" in finished.stderr
    assert "Traceback" not in finished.stderr
    left = [p for p in psutil.process_iter(["cmdline"]) if str(output_dir) in " ".join(p.info["cmdline"] or [])]
    assert not left
