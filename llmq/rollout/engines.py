"""Which engine generates: the ``engine`` key of every command that samples, and the engine it builds.

* ``hf`` — :class:`~llmq.rollout.HFEngine`, transformers' ``generate`` on the loaded model (the
  default; the only engine that runs logits processors, hence token-level Q-guided decoding);
* ``vllm`` — :class:`~llmq.rollout.VLLMEngine`, vLLM in this process (install ``llmq[vllm]``; on a
  CPU, vLLM's CPU build);
* ``vllm_server`` — :class:`~llmq.rollout.VLLMServerEngine`, a client of one or more running
  ``vllm serve`` (OpenAI-compatible) servers: the bridge from an environment without vLLM, and the
  way to spread rollouts over several GPUs or machines.
"""

from __future__ import annotations

import dataclasses
import os

from llmq.errors import UserError
from llmq.models import resolve_model
from llmq.rollout.base import Engine
from llmq.rollout.hf import HFEngine

ENGINES = ("hf", "vllm", "vllm_server")


@dataclasses.dataclass
class VLLMSettings:
    """How vLLM runs a model: keys shared by ``engine: vllm`` (an engine in this process) and ``llmq serve``."""

    vllm_gpu_memory_utilization: float | None = dataclasses.field(
        default=None, metadata={"help": "vLLM: fraction of GPU memory vLLM takes (default: vLLM's)."}
    )
    vllm_tensor_parallel_size: int = dataclasses.field(
        default=1, metadata={"help": "vLLM: GPUs that one model is split over."}
    )
    vllm_max_model_len: int | None = dataclasses.field(
        default=None, metadata={"help": "vLLM: longest prompt + completion (default: the model's)."}
    )
    vllm_enable_prefix_caching: bool = dataclasses.field(
        default=True, metadata={"help": "vLLM: reuse the KV cache of shared prompt prefixes (best-of-N, Q*)."}
    )

    def __post_init__(self) -> None:
        self.check_vllm_settings()

    def check_vllm_settings(self) -> None:
        if self.vllm_gpu_memory_utilization is not None and not 0 < self.vllm_gpu_memory_utilization <= 1:
            raise UserError(
                f"key 'vllm_gpu_memory_utilization' must be in (0, 1], got {self.vllm_gpu_memory_utilization}"
            )
        if self.vllm_tensor_parallel_size < 1 or (self.vllm_max_model_len is not None and self.vllm_max_model_len < 1):
            raise UserError("keys 'vllm_tensor_parallel_size' and 'vllm_max_model_len' must be at least 1")


@dataclasses.dataclass
class EngineConfig(VLLMSettings):
    """The engine keys (recipe keys or ``--flags``) of the commands that generate."""

    engine: str = dataclasses.field(
        default="hf",
        metadata={
            "help": "What generates: hf (transformers on the loaded model; runs logits processors), vllm (vLLM in "
            "this process: pip install 'llmq[vllm]'), or vllm_server (running `vllm serve` servers at "
            "vllm_server_url).",
            "choices": list(ENGINES),
        },
    )
    vllm_server_url: list[str] = dataclasses.field(
        default_factory=lambda: ["http://127.0.0.1:8000"],
        metadata={"help": "engine vllm_server: the servers' base URLs; several spread the requests (data parallel)."},
    )
    vllm_api_key: str | None = dataclasses.field(
        default=None,
        metadata={
            "help": "engine vllm_server: the servers' --api-key (sent as a Bearer token); default $VLLM_API_KEY."
        },
    )
    vllm_timeout: float = dataclasses.field(
        default=600.0, metadata={"help": "engine vllm_server: seconds per request before it is given up."}
    )

    def check_engine(self) -> None:
        """The engine keys on their own; combinations with decoding keys are checked where those live."""
        if self.engine not in ENGINES:
            raise UserError(f"key 'engine': '{self.engine}' is not one of {', '.join(ENGINES)}")
        if not self.vllm_server_url or not all(
            url.startswith(("http://", "https://")) for url in self.vllm_server_url
        ):
            raise UserError(f"key 'vllm_server_url': expected http(s) URLs, got {self.vllm_server_url}")
        if not 0 < self.vllm_timeout < float("inf"):
            raise UserError(f"key 'vllm_timeout' must be a positive number of seconds, got {self.vllm_timeout}")
        self.check_vllm_settings()

    def engine_keys(self) -> dict:
        """The keys of :class:`EngineConfig` with this config's values: to hand the engine on to another config."""
        return {field.name: getattr(self, field.name) for field in dataclasses.fields(EngineConfig)}

    def settings_record(self) -> dict:
        """Every key of this config (and of a config that inherits it) but the API key: what files record."""
        return {key: value for key, value in dataclasses.asdict(self).items() if key != "vllm_api_key"}

    def engine_record(self) -> dict:
        """What a report records of the engine: its name.  Where a server runs, how long a request may
        take and its API key do not change what is generated, so a run resumes across them."""
        return {"engine": self.engine}


def make_engine(
    config: EngineConfig,
    model,
    tokenizer,
    model_name: str,
    *,
    batch_size: int = 8,
    progress: bool = True,
    logits_processor: list | None = None,
) -> Engine:
    """The engine ``config`` names, generating from the model ``model_name`` (``model`` and ``tokenizer``
    are that model loaded with transformers: HFEngine runs them, VLLMEngine loads the model in its
    dtype, the server client uses the tokenizer and checks that the server serves the same model).
    Logits processors need ``engine: hf``.  Every engine seeds each request itself."""
    if logits_processor and config.engine != "hf":
        raise UserError(f"engine {config.engine} runs no logits processor (Q-guided decoding): use engine hf")
    if config.engine == "hf":
        return HFEngine(
            model, tokenizer, batch_size=batch_size, progress=progress, logits_processor=logits_processor or ()
        )
    # vLLM is an optional extra (llmq[vllm]); its module imports it when an engine is built.
    from llmq.rollout.vllm import VLLMEngine, VLLMServerEngine

    if config.engine == "vllm":
        options = {
            "tensor_parallel_size": config.vllm_tensor_parallel_size,
            "enable_prefix_caching": config.vllm_enable_prefix_caching,
        }
        if config.vllm_max_model_len is not None:
            options["max_model_len"] = config.vllm_max_model_len
        try:
            return VLLMEngine(
                model_name,
                dtype=str(model.dtype).removeprefix("torch."),
                gpu_memory_utilization=config.vllm_gpu_memory_utilization,
                **options,
            )
        except ImportError as error:
            raise UserError(
                f"engine vllm needs vLLM in this environment ({error}); pip install 'llmq[vllm]', or use engine "
                "vllm_server"
            ) from None
    return VLLMServerEngine(
        config.vllm_server_url,
        tokenizer=tokenizer,
        expected_model=resolve_model(model_name),
        api_key=config.vllm_api_key or os.environ.get("VLLM_API_KEY"),
        timeout=config.vllm_timeout,
    )
