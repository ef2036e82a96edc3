"""Multi-process training: ``llmq train RECIPE --accelerate_config zero2 --num_processes N``.

As TRL's CLI does, ``llmq train`` starts ``accelerate launch`` programmatically with a preset
shipped in ``llmq/accelerate_configs/`` (``ddp``, ``zero2``, ``zero3``, ``zero2_offload``,
``zero3_offload``) or any accelerate config file; every process runs ``llmq train`` with the same
recipe and flags. On a machine without CUDA the processes run on the CPU with the gloo backend.
"""

from __future__ import annotations

import dataclasses
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
    num_processes: int = dataclasses.field(
        default=1, metadata={"help": "Training processes (GPUs, or CPU processes on a machine without CUDA)."}
    )
    resume: bool = dataclasses.field(
        default=False,
        metadata={
            "help": "Continue from the newest complete checkpoint in output_dir (start from scratch when there is "
            "none)."
        },
    )

    def __post_init__(self) -> None:
        if self.num_processes < 1:
            raise UserError(f"key 'num_processes' must be at least 1, got {self.num_processes}")
        if self.accelerate_config is not None:
            self.config_file()

    @property
    def distributed(self) -> bool:
        """Whether this invocation starts training processes (and is not itself one of them)."""
        return (self.accelerate_config is not None or self.num_processes > 1) and not is_launched_process()

    def config_file(self) -> Path:
        name = self.accelerate_config or "ddp"
        if name in preset_names():
            return PRESETS_DIR / f"{name}.yaml"
        if Path(name).is_file():
            return Path(name)
        raise UserError(
            f"key 'accelerate_config': '{name}' is neither a preset ({', '.join(preset_names())}) nor an existing file"
        )


def launch_training(argv: Sequence[str], launch: LaunchConfig) -> None:
    """Run ``llmq train ARGV`` in ``launch.num_processes`` processes through ``accelerate launch``."""
    config_file = launch.config_file()
    config = yaml.safe_load(config_file.read_text()) or {}
    deepspeed = config.get("distributed_type") == "DEEPSPEED"
    script_args = list(argv)
    environment = {LAUNCHED_ENV: "1"}
    if not torch.cuda.is_available():
        if deepspeed:
            # DeepSpeed picks NCCL unless told otherwise; accelerate's CPU switch would drop DeepSpeed.
            if "--ddp_backend" not in script_args:
                script_args += ["--ddp_backend", "gloo"]
        else:
            # `accelerate launch --cpu` starts one process; this variable runs N CPU processes (gloo).
            environment["ACCELERATE_USE_CPU"] = "1"
    previous = {name: os.environ.get(name) for name in environment}
    os.environ.update(environment)
    launch_args = ["--config_file", str(config_file), "--num_processes", str(launch.num_processes)]
    if "main_process_port" not in config:
        # accelerate's default port (29500) is shared by every run on the machine: a second run would join the first
        # one's rendezvous.
        launch_args += ["--main_process_port", str(_free_port())]
    launch_args += ["-m", "llmq.cli", "train", *script_args]
    try:
        launch_command(launch_command_parser().parse_args(launch_args))
    except Exception as error:  # torch's ChildFailedError, or the launcher refusing the config
        summary = " ".join(str(error).split())[:300]
        raise UserError(
            f"training with {launch.num_processes} processes ({config_file.name}) failed: {summary}; the processes' "
            "own messages are above"
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
