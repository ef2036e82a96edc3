"""``llmq serve``: vLLM's OpenAI-compatible server, started with what ``engine: vllm_server`` relies on.

The command is vLLM's own server (``python -m vllm.entrypoints.openai.api_server``, what ``vllm serve``
runs) with settings chosen for llmq's client: the model as ``llmq eval`` resolves it (a registered name
becomes its prepared directory, so the client's model check matches), fp32 on a CPU, and on a CPU the
whole prompt prefilled in one step (seeded requests need it in vLLM 0.32, see
:class:`~llmq.rollout.VLLMEngine`). Any vLLM option not covered here goes after ``--``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys

from llmq.config import ModelConfig, mirror
from llmq.errors import UserError
from llmq.models import check_model_reference
from llmq.rollout.engines import VLLMSettings
from llmq.rollout.vllm import cpu_threads_bind


@dataclasses.dataclass
class ServeConfig:
    """The keys of ``llmq serve`` besides :class:`~llmq.rollout.engines.VLLMSettings` (recipe keys or ``--flags``);
    options after ``--`` go to vLLM unchanged."""

    # The model keys of every other command, with their defaults and help.
    model_name_or_path: str = mirror(ModelConfig, "model_name_or_path")
    dtype: str = mirror(ModelConfig, "dtype")
    trust_remote_code: bool = mirror(ModelConfig, "trust_remote_code")
    host: str = dataclasses.field(
        default="127.0.0.1",
        metadata={"help": "Address to listen on: loopback by default; 0.0.0.0 serves other machines."},
    )
    port: int = dataclasses.field(default=8000, metadata={"help": "Port to listen on."})
    api_key: str | None = dataclasses.field(
        default=None,
        metadata={"help": "Requests must carry this key (Bearer token); default $VLLM_API_KEY, else none needed."},
    )
    enable_weight_sync: bool = dataclasses.field(
        default=False,
        metadata={
            "help": "Let a training loop replace the served weights: turns on vLLM's development endpoints "
            "(VLLM_SERVER_DEV_MODE=1: reload from a directory, and on a GPU NCCL weight transfer). Anyone who "
            "can reach the server can then call them: keep it on loopback or behind api_key."
        },
    )
    cpu_kv_cache_gib: float = dataclasses.field(
        default=2.0,
        metadata={"help": "On a CPU: GiB of RAM for the KV cache (unless $VLLM_CPU_KVCACHE_SPACE is set)."},
    )

    def __post_init__(self) -> None:
        check_model_reference(self.model_name_or_path)
        if not 0 < self.port < 65536:
            raise UserError(f"key 'port': {self.port} is not a TCP port")
        if self.cpu_kv_cache_gib <= 0:
            raise UserError(f"key 'cpu_kv_cache_gib' must be positive, got {self.cpu_kv_cache_gib}")


def serve_command(
    config: ServeConfig, vllm: VLLMSettings, model_path: str, dtype: str, *, cpu: bool, vllm_args: list[str]
) -> tuple[list[str], dict[str, str]]:
    """The server's argv (no shell: every value is one argument) and the environment variables it adds.

    ``model_path``: the resolved model (a registered name's directory); ``dtype``: a concrete dtype name;
    ``cpu``: whether vLLM runs on a CPU here; ``vllm_args``: passed through last, so they win.
    """
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model_path, "--dtype", dtype]
    command += ["--host", config.host, "--port", str(config.port)]
    command += ["--tensor-parallel-size", str(vllm.vllm_tensor_parallel_size)]
    command.append("--enable-prefix-caching" if vllm.vllm_enable_prefix_caching else "--no-enable-prefix-caching")
    if vllm.vllm_max_model_len is not None:
        command += ["--max-model-len", str(vllm.vllm_max_model_len)]
    if vllm.vllm_gpu_memory_utilization is not None:
        command += ["--gpu-memory-utilization", str(vllm.vllm_gpu_memory_utilization)]
    if config.trust_remote_code:
        command.append("--trust-remote-code")
    if config.api_key:
        command += ["--api-key", config.api_key]  # otherwise vLLM reads $VLLM_API_KEY itself
    env: dict[str, str] = {}
    if cpu:
        command += ["--enforce-eager", "--no-enable-chunked-prefill"]
        env["VLLM_CPU_KVCACHE_SPACE"] = os.environ.get("VLLM_CPU_KVCACHE_SPACE") or f"{config.cpu_kv_cache_gib:g}"
        env["VLLM_CPU_OMP_THREADS_BIND"] = os.environ.get("VLLM_CPU_OMP_THREADS_BIND") or cpu_threads_bind()
    if config.enable_weight_sync:
        env["VLLM_SERVER_DEV_MODE"] = "1"
        if not cpu:  # the trainer broadcasts its weights to the server's workers (NCCL needs GPUs)
            command += ["--weight-transfer-config", json.dumps({"backend": "nccl"})]
    return command + vllm_args, env
