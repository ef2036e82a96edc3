"""Multi-process training: ``llmq train RECIPE --accelerate_config zero2 --num_processes N``, on one machine or several
(``--num_machines M --machine_rank R --main_process_ip HOST --main_process_port PORT`` on each).

As TRL's CLI does, ``llmq train`` starts ``accelerate launch`` programmatically with a preset
shipped in ``llmq/accelerate_configs/`` (``ddp``, ``zero2``, ``zero3``, ``zero2_offload``,
``zero3_offload``) or any accelerate config file; every process runs ``llmq train`` with the same
recipe and flags. On a machine without CUDA the processes run on the CPU with the gloo backend.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import socket
from collections.abc import Sequence
from pathlib import Path

import torch
import yaml
from accelerate.commands.launch import launch_command, launch_command_parser

from llmq.errors import UserError

PRESETS_DIR = Path(__file__).parent / "accelerate_configs"
# Set for the launched processes, so that they train instead of launching again.
LAUNCHED_ENV = "LLMQ_LAUNCHED"


def preset_names() -> list[str]:
    return sorted(path.stem for path in PRESETS_DIR.glob("*.yaml"))


@dataclasses.dataclass
class LaunchConfig:
    """How many processes train, with which accelerate / DeepSpeed configuration, and from where."""

    accelerate_config: str | None = dataclasses.field(
        default=None,
        metadata={
            "help": "Train in several processes with this accelerate config: a preset "
            f"({', '.join(preset_names())}) or a config file. "
            "Default: ddp when num_processes > 1."
        },
    )
    num_processes: int | None = dataclasses.field(
        default=None,
        metadata={
            "help": "Training processes on all machines together (GPUs, or CPU processes on a machine without CUDA). "
            "Default: the accelerate config's num_processes, else 1."
        },
    )
    num_machines: int | None = dataclasses.field(
        default=None, metadata={"help": "Machines taking part. Default: the accelerate config's, else 1."}
    )
    machine_rank: int | None = dataclasses.field(
        default=None,
        metadata={
            "help": "This machine's rank, 0 to num_machines − 1; machine 0 builds data, benchmarks and writes the "
            "summary. Default: the accelerate config's, else 0."
        },
    )
    main_process_ip: str | None = dataclasses.field(
        default=None,
        metadata={"help": "Address of machine 0, where the processes meet (several machines). Default: the config's."},
    )
    rendezvous_timeout: int = dataclasses.field(
        default=600,
        metadata={"help": "Seconds the machines wait for each other at machine 0's address before the launch fails."},
    )
    main_process_port: int | None = dataclasses.field(
        default=None,
        metadata={
            "help": "Port on machine 0 where the processes meet. Default: the config's; on one machine a free port."
        },
    )
    resume: bool = dataclasses.field(
        default=False,
        metadata={
            "help": "Continue from the newest complete checkpoint in output_dir (start from scratch when there is "
            "none)."
        },
    )

    def __post_init__(self) -> None:
        # An accelerate config file's settings apply unless a key overrides them.
        file = {}
        if self.accelerate_config is not None:
            file = yaml.safe_load(self.config_file().read_text()) or {}
        for key, default in (
            ("num_processes", 1),
            ("num_machines", 1),
            ("machine_rank", 0),
            ("main_process_ip", None),
            ("main_process_port", None),
        ):
            if getattr(self, key) is None:
                setattr(self, key, file.get(key, default))
        if self.num_processes < 1:
            raise UserError(f"key 'num_processes' must be at least 1, got {self.num_processes}")
        if self.num_machines < 1 or not 0 <= self.machine_rank < self.num_machines:
            raise UserError(
                f"keys 'num_machines' and 'machine_rank': rank {self.machine_rank} of {self.num_machines} machines; "
                "the rank must be 0 to num_machines − 1"
            )
        if self.num_processes % self.num_machines:
            raise UserError(
                f"key 'num_processes' counts the processes of all machines: {self.num_processes} does not split "
                f"evenly over {self.num_machines} machines"
            )
        if self.num_machines > 1 and (self.main_process_ip is None or self.main_process_port is None):
            raise UserError(
                "keys 'main_process_ip' and 'main_process_port': with several machines every machine needs machine "
                "0's address and port"
            )

    @property
    def distributed(self) -> bool:
        """Whether this invocation starts training processes (and is not itself one of them)."""
        several = self.accelerate_config is not None or self.num_processes > 1 or self.num_machines > 1
        return several and not is_launched_process()

    def config_file(self) -> Path:
        name = self.accelerate_config or "ddp"
        if name in preset_names():
            return PRESETS_DIR / f"{name}.yaml"
        if Path(name).is_file():
            return Path(name)
        raise UserError(
            f"key 'accelerate_config': '{name}' is neither a preset ({', '.join(preset_names())}) nor an existing file"
        )


def launch_training(argv: Sequence[str], launch: LaunchConfig, resume_from_checkpoint: str | None = None) -> None:
    """Run ``llmq train ARGV`` in ``launch.num_processes`` processes through ``accelerate launch``; with
    ``resume_from_checkpoint`` (the launching process's validated checkpoint) they continue from it."""
    config_file = launch.config_file()
    config = yaml.safe_load(config_file.read_text()) or {}
    deepspeed = config.get("distributed_type") == "DEEPSPEED"
    script_args = list(argv)
    if resume_from_checkpoint:
        script_args += ["--resume_from_checkpoint", str(resume_from_checkpoint)]
    environment = {LAUNCHED_ENV: "1"}
    if not torch.cuda.is_available():
        if deepspeed:
            # DeepSpeed picks NCCL unless told otherwise; accelerate's CPU switch would drop DeepSpeed.
            if "--ddp_backend" not in script_args:
                script_args += ["--ddp_backend", "gloo"]
        else:
            # `accelerate launch --cpu` starts one process; this variable runs N CPU processes (gloo).
            environment["ACCELERATE_USE_CPU"] = "1"
    deepspeed_config = config.get("deepspeed_config") or {}
    deepspeed_args, zero_stage = [], deepspeed_config.get("zero_stage")
    if deepspeed_file := deepspeed_config.get("deepspeed_config_file"):
        # Read relative to the config file (as the presets name theirs), not to the working directory.
        deepspeed_file = config_file.parent / deepspeed_file
        if not deepspeed_file.is_file():
            raise UserError(f"key 'deepspeed_config_file' of {config_file}: {deepspeed_file} is not a file")
        deepspeed_args = ["--deepspeed_config_file", str(deepspeed_file)]
        try:
            zero_stage = json.loads(deepspeed_file.read_text())["zero_optimization"]["stage"]
        except (ValueError, KeyError, TypeError):  # not ZeRO, or a file DeepSpeed itself will refuse with its reason
            zero_stage = None
    if zero_stage == 3 and not torch.cuda.is_available() and "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        # ZeRO-3 gathers and frees every layer's weights in every step; with glibc's dynamic threshold (up to 32 MiB)
        # the freed blocks stay in the heap. Fixed at 1 MiB, each is returned at once: a process of a 0.5B model
        # peaked at 8.2 instead of 10.9 GiB, for 1.7× the step time (docs/results.md).
        environment["MALLOC_MMAP_THRESHOLD_"] = str(2**20)
    previous = {name: os.environ.get(name) for name in environment}
    os.environ.update(environment)
    launch_args = ["--config_file", str(config_file), *deepspeed_args, "--num_processes", str(launch.num_processes)]
    launch_args += ["--num_machines", str(launch.num_machines), "--machine_rank", str(launch.machine_rank)]
    if launch.main_process_ip is not None:
        launch_args += ["--main_process_ip", launch.main_process_ip]
    # accelerate's default port (29500) is shared by every run on the machine: a second run would join the first one's
    # rendezvous.
    port = launch.main_process_port or _free_port()
    launch_args += ["--main_process_port", str(port), "--rdzv_conf", f"timeout={launch.rendezvous_timeout}"]
    launch_args += ["-m", "llmq.cli", "train", *script_args]
    try:
        launch_command(launch_command_parser().parse_args(launch_args))
    except Exception as error:  # torch's ChildFailedError, a rendezvous timeout, or the launcher refusing the config
        summary = " ".join(str(error).split())[:300]
        meeting = f"{launch.main_process_ip or '127.0.0.1'}:{port}"
        raise UserError(
            f"training with {launch.num_processes} processes on {launch.num_machines} machine(s) ({config_file.name}, "
            f"meeting at {meeting}) failed: {summary}; the processes' own messages are above"
        ) from None
    finally:
        for name, value in previous.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def is_launched_process() -> bool:
    """Whether this process is one of the training processes that :func:`launch_training` started."""
    return os.environ.get(LAUNCHED_ENV) == "1"


def share_fp32_master_weights() -> None:
    """Let DeepSpeed's ZeRO-3 optimizer use an fp32 model's own parameter shard as its fp32 master copy.

    DeepSpeed 0.19.8 means to (``DeepSpeedZeroOptimizer_Stage3._create_fp32_partitions`` shares the shard when dtype
    and device match) but compares ``shard.device == self.device`` with ``self.device`` a string, which is False in
    torch 2.13 (``torch.device("cpu") == "cpu"``); every process then held a redundant fp32 copy of its shard, 0.94 GiB
    per process of a 0.5B model in two (docs/results.md). The call runs with ``self.device`` as a ``torch.device``.
    """
    # DeepSpeed is an optional extra (llmq[deepspeed]), needed only by the processes of a DeepSpeed launch.
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3 as Optimizer

    create = Optimizer._create_fp32_partitions

    @functools.wraps(create)
    def create_comparing_devices(self) -> None:
        name = self.device
        if not self.offload_optimizer:  # offloaded, the master copy is made on its own device before any comparison
            self.device = torch.device(name)
        try:
            create(self)
        finally:
            self.device = name

    Optimizer._create_fp32_partitions = create_comparing_devices


def gather_and_scatter_in_place_over_gloo() -> None:
    """Let DeepSpeed's all-gathers and reduce-scatters on gloo work in the tensors they are given.

    torch's gloo ``all_gather_into_tensor`` and ``reduce_scatter_tensor`` copy the whole flat tensor into a temporary
    of its size: ZeRO-3 gathers each layer's weights and reduce-scatters its gradient through them, and for Qwen's tied
    151,936 × 896 embedding that is 0.51 GiB more at the step's peak (docs/results.md). A broadcast of each rank's
    chunk into the output, or a reduce of each rank's chunk of the input to that rank, moves the same bytes in place.
    Other backends (NCCL) and asynchronous reduce-scatters keep torch's collectives. A reduce may leave partial sums in
    the input's other chunks; DeepSpeed frees the gradients it reduce-scatters right after.
    """
    # DeepSpeed is an optional extra (llmq[deepspeed]), needed only by the processes of a DeepSpeed launch.
    from deepspeed.comm.torch import ReduceOp, TorchBackend

    gather, scatter = TorchBackend.all_gather_into_tensor, TorchBackend.reduce_scatter_tensor
    distributed = torch.distributed

    def on_gloo(group: object, *tensors: torch.Tensor) -> bool:  # and tensors that split into the ranks' chunks
        return distributed.get_backend(group) == "gloo" and all(t.is_contiguous() and t.numel() > 0 for t in tensors)

    @functools.wraps(gather)
    def gather_by_broadcasts(self, output_tensor, input_tensor, group=None, async_op=False):
        if not on_gloo(group, output_tensor, input_tensor):
            return gather(self, output_tensor, input_tensor, group=group, async_op=async_op)
        group = group or distributed.group.WORLD
        chunks = output_tensor.view(-1).chunk(distributed.get_world_size(group))
        chunks[distributed.get_rank(group)].copy_(input_tensor.view(-1))
        works = [
            distributed.broadcast(chunk, distributed.get_global_rank(group, rank), group, async_op=True)
            for rank, chunk in enumerate(chunks)
        ]
        everything = torch.futures.collect_all([work.get_future() for work in works])
        if async_op:
            return everything
        everything.wait()

    @functools.wraps(scatter)
    def scatter_by_reduces(self, output_tensor, input_tensor, op=ReduceOp.SUM, group=None, async_op=False):
        if async_op or not on_gloo(group, output_tensor, input_tensor):
            return scatter(self, output_tensor, input_tensor, op=op, group=group, async_op=async_op)
        group = group or distributed.group.WORLD
        chunks = input_tensor.view(-1).chunk(distributed.get_world_size(group))
        for rank, chunk in enumerate(chunks):
            distributed.reduce(chunk, distributed.get_global_rank(group, rank), self._reduce_op(op), group)
        own = chunks[distributed.get_rank(group)]
        if own.data_ptr() != output_tensor.data_ptr():  # ZeRO-3's output is the input's own chunk already
            output_tensor.view(-1).copy_(own)

    TorchBackend.all_gather_into_tensor = gather_by_broadcasts
    TorchBackend.reduce_scatter_tensor = scatter_by_reduces
