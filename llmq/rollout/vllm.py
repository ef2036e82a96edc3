"""vLLM engines behind llmq's ``Engine.generate``: offline in-process :class:`VLLMEngine` (with
weight sync for online loops) and :class:`VLLMServerEngine`, a client of a running ``vllm serve``.

Both return what :class:`llmq.rollout.HFEngine` returns, for the same prompts and settings:

- prompts are rendered as HFEngine renders them (chat messages through the tokenizer's chat
  template with ``add_generation_prompt=True``) and tokenised here with ``add_special_tokens=False``;
  vLLM receives the token ids, so both engines condition on exactly the same tokens;
- ``logprobs`` are log π of each sampled token *before* temperature, top-k and top-p: vLLM 0.32's
  ``logprobs_mode`` defaults to ``"raw_logprobs"`` (a log-softmax of the model's logits before any
  processor, penalty or temperature), which VLLMEngine also passes explicitly. ``processed_logprobs``
  (TRL's choice, for importance weights of the *sampling* distribution) would be after temperature;
- ``text`` is ``decode(token_ids, skip_special_tokens=True)`` cut before the first stop string,
  ``token_ids`` / ``logprobs`` run up to and including the token that completed a stop string or the
  EOS, and ``finish_reason`` is ``"stop"`` (EOS or stop string) or ``"length"``;
- request ``i`` is sampled with the seed ``request_seed(sampling.seed, i)``: the same prompts and
  ``SamplingParams`` give the same samples, and the ``n`` samples of a prompt differ from each other.
  (The samples are not those of HFEngine for the same seed: the random streams differ.)

``num_beams > 1`` uses vLLM's ``LLM.beam_search`` with ``length_penalty=0`` (the plain sum of token
log-probs, as HFEngine ranks beams); stop strings then cut the finished beams afterwards. The
server client does not do beam search (ValueError). ``LLM.beam_search`` submits one request per beam
and token (vllm-project/vllm#14426): on 2 CPU cores the embedded model's first 8 questions (4 beams,
64 tokens) did not finish in 3 minutes, where HFEngine needed about 8 s a question even while
sharing the cores with another run; use ``engine: hf`` for beam search on a CPU.

vLLM is imported only when a :class:`VLLMEngine` is built, so this module imports without it.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import gc
import hashlib
import os
import socket
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import httpx
import openai
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoConfig

from llmq.errors import UserError
from llmq.models import load_tokenizer, resolve_dtype, resolve_model
from llmq.rollout.base import Completion, Prompt, SamplingParams

# Head sizes that vLLM 0.32's CPU attention backend runs (CPUAttentionBackend.get_supported_head_sizes).
_CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)


def cpu_threads_bind() -> str:
    """``VLLM_CPU_OMP_THREADS_BIND`` for every core this process may use (vLLM's CPU build binds a thread to each)."""
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else range(os.cpu_count() or 1)
    return ",".join(map(str, cores))


def request_seed(seed: int, index: int) -> int:
    """The seed of the ``index``-th prompt's request: a 63-bit hash of (``seed``, ``index``)."""
    digest = hashlib.blake2b(f"llmq:{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def render(tokenizer, prompt: Prompt) -> str:
    """A raw prompt as is; chat messages through the chat template (as :meth:`HFEngine.render`)."""
    if isinstance(prompt, str):
        return prompt
    return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)


def encode(tokenizer, prompt: Prompt) -> list[int]:
    """Prompt token ids as HFEngine feeds them (chat templates already hold their special tokens)."""
    return tokenizer(render(tokenizer, prompt), add_special_tokens=False)["input_ids"]


def make_completion(
    tokenizer, token_ids: list[int], logprobs: list[float], finish_reason: str | None, stop: Iterable[str]
) -> Completion:
    """A :class:`Completion` whose text is cut at stop strings exactly as HFEngine cuts it."""
    if finish_reason not in ("stop", "length"):
        raise RuntimeError(f"vLLM finished a request with reason {finish_reason!r}")
    text = tokenizer.decode(token_ids, skip_special_tokens=True)
    stopped = finish_reason == "stop"
    for string in stop:
        if string in text:
            text, stopped = text[: text.index(string)], True
    return Completion(
        text=text,
        token_ids=list(token_ids),
        logprobs=[float(x) for x in logprobs],
        finish_reason="stop" if stopped else "length",
    )


def _repeat(completion: Completion, n: int) -> list[Completion]:
    """``n`` independent copies (greedy decoding asks the engine for one sample, as HF would give n equal ones)."""
    return [
        dataclasses.replace(completion, token_ids=list(completion.token_ids), logprobs=list(completion.logprobs))
        for _ in range(n)
    ]


@contextlib.contextmanager
def named_weights(model_or_state_dict) -> Iterator[list[tuple[str, object]]]:
    """``(name, tensor)`` pairs in Hugging Face checkpoint names, from a state dict or a model.

    A PEFT model has its adapters merged for the duration (names lose ``base_model.model.`` and
    ``.base_layer``, LoRA tensors are skipped), as TRL's ``VLLMGeneration._iter_named_params`` does.
    """
    if isinstance(model_or_state_dict, Mapping):
        yield [(name, tensor.detach()) for name, tensor in model_or_state_dict.items()]
        return
    model = model_or_state_dict
    if hasattr(model, "peft_config") and hasattr(model, "merge_adapter"):
        model.merge_adapter()
        try:
            weights = []
            for name, param in model.named_parameters():
                name = name.removeprefix("base_model.model.").replace(".base_layer", "")
                if getattr(model, "prefix", "lora_") in name or "original_module" in name:
                    continue
                weights.append((name.replace("modules_to_save.default.", ""), param.detach()))
            yield weights
        finally:
            model.unmerge_adapter()
        return
    yield [(name, tensor.detach()) for name, tensor in model.state_dict().items()]


def _checkpoint_names(directory: str) -> set[str] | None:
    """Tensor names in a local checkpoint's safetensors files (None when there are none)."""
    files = sorted(Path(directory).glob("*.safetensors")) if Path(directory).is_dir() else []
    if not files:
        return None
    names: set[str] = set()
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            names.update(handle.keys())
    return names


class VLLMEngine:
    """Generate with an offline, in-process ``vllm.LLM``.

    Args:
        model_name_or_path: a registry name (``smollm2-135m-instruct``, ``tiny-llama``), a local HF
            directory or a Hub id; registry names are prepared and resolved with
            :func:`llmq.models.resolve_model`.
        dtype: ``auto`` is float32 on a CPU and bfloat16 on a GPU that has it (as
            :func:`llmq.models.resolve_dtype`); or ``float32`` / ``bfloat16`` / ``float16``.
        seed: vLLM's engine seed (requests carry their own seeds, see :func:`request_seed`).
        enforce_eager: no CUDA graphs / torch.compile; ``None`` means True on a CPU (vLLM starts in
            ~20 s instead of ~2 min there) and False on a GPU.
        gpu_memory_utilization: vLLM's fraction of GPU memory (on a CPU: of RAM) to take; ``None``
            keeps vLLM's default on a GPU. On a CPU, unless ``VLLM_CPU_KVCACHE_SPACE`` or
            ``kv_cache_memory_bytes`` is given, the KV cache gets ``cpu_kv_cache_gib`` GiB.
        multiprocessing: run vLLM's engine core in a child process (vLLM's default). The default,
            False, keeps it in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), which
            :meth:`load_weights` relies on to hand tensors over without copying them through IPC.
            In-process engines are not meant to coexist: :meth:`close` one before building the next.
        trust_remote_code: off unless asked for.
        progress: vLLM's progress bars.
        **llm_kwargs: passed to ``vllm.LLM`` (``max_model_len``, ``max_num_seqs``, ...).

    Environment: on a CPU this sets ``VLLM_CPU_OMP_THREADS_BIND`` (when unset) to every core this
    process may use, and ``VLLM_ENABLE_V1_MULTIPROCESSING`` from ``multiprocessing``. Scripts that
    use ``multiprocessing=True`` need an ``if __name__ == "__main__":`` guard (vLLM spawns). An
    in-process engine on a CPU also replaces ``torch.set_num_threads`` with a no-op for the rest of
    the process (vLLM's CPU worker does that once it has set up its threads).
    """

    def __init__(
        self,
        model_name_or_path: str,
        *,
        dtype: str = "auto",
        seed: int = 0,
        enforce_eager: bool | None = None,
        gpu_memory_utilization: float | None = None,
        cpu_kv_cache_gib: float = 2.0,
        multiprocessing: bool = False,
        trust_remote_code: bool = False,
        revision: str | None = None,
        progress: bool = False,
        **llm_kwargs,
    ) -> None:
        self.model_path = resolve_model(model_name_or_path)
        self.tokenizer = load_tokenizer(self.model_path, trust_remote_code=trust_remote_code, revision=revision)
        self.progress = progress

        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1" if multiprocessing else "0"
        import vllm.envs  # vLLM is an optional extra (llmq[vllm]): imported when an engine is built

        if hasattr(vllm.envs, "disable_envs_cache"):  # an earlier in-process engine froze the env
            vllm.envs.disable_envs_cache()
        from vllm.platforms import current_platform  # optional extra, as above

        cpu = current_platform.is_cpu()
        if cpu:
            os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", cpu_threads_bind())
            if not os.environ.get("VLLM_CPU_KVCACHE_SPACE") and "kv_cache_memory_bytes" not in llm_kwargs:
                llm_kwargs["kv_cache_memory_bytes"] = int(cpu_kv_cache_gib * 2**30)
            # vLLM 0.32 on a CPU: when a seeded request's prefill is split over scheduler steps, the
            # worker rewinds its torch.Generator with set_offset, which CPU generators lack
            # ("RuntimeError: CPU Generator does not use offset"). Whole prefills avoid the rewind.
            llm_kwargs.setdefault("enable_chunked_prefill", False)
            self._check_cpu_head_size(trust_remote_code, revision)
        if gpu_memory_utilization is not None:
            llm_kwargs["gpu_memory_utilization"] = gpu_memory_utilization
        dtype_name = str(resolve_dtype(dtype)).removeprefix("torch.")
        from vllm import LLM  # optional extra, as above

        self.llm = LLM(
            model=self.model_path,
            tokenizer=self.model_path,
            dtype=dtype_name,
            seed=seed,
            enforce_eager=cpu if enforce_eager is None else enforce_eager,
            trust_remote_code=trust_remote_code,
            revision=revision,
            logprobs_mode="raw_logprobs",
            **llm_kwargs,
        )
        self._expected_weights = _checkpoint_names(self.model_path)

    def _check_cpu_head_size(self, trust_remote_code: bool, revision: str | None) -> None:
        config = AutoConfig.from_pretrained(self.model_path, trust_remote_code=trust_remote_code, revision=revision)
        config = getattr(config, "text_config", None) or config
        heads = getattr(config, "num_attention_heads", None)
        head_dim = getattr(config, "head_dim", None) or (config.hidden_size // heads if heads else None)
        if head_dim is not None and head_dim not in _CPU_HEAD_SIZES:
            raise ValueError(
                f"{self.model_path}: head size {head_dim} is not supported by vLLM's CPU attention "
                f"(head sizes {', '.join(map(str, _CPU_HEAD_SIZES))}); use HFEngine for this model"
            )

    def render(self, prompt: Prompt) -> str:
        return render(self.tokenizer, prompt)

    def generate(
        self, prompts: list[Prompt], n: int = 1, sampling: SamplingParams = SamplingParams()
    ) -> list[list[Completion]]:
        token_prompts = [{"prompt_token_ids": encode(self.tokenizer, p)} for p in prompts]
        if not token_prompts:
            return []
        if sampling.num_beams > 1:
            return self._beam_search(token_prompts, n, sampling)
        from vllm import SamplingParams as VLLMSamplingParams  # optional extra (llmq[vllm])

        greedy = sampling.temperature == 0
        params = [
            VLLMSamplingParams(
                n=1 if greedy else n,
                max_tokens=sampling.max_new_tokens,
                temperature=sampling.temperature,
                top_p=1.0 if greedy else sampling.top_p,
                top_k=0 if greedy else sampling.top_k,
                stop=list(sampling.stop) or None,
                seed=request_seed(sampling.seed, index),
                logprobs=0,
                skip_special_tokens=True,
            )
            for index in range(len(token_prompts))
        ]
        outputs = self.llm.generate(token_prompts, params, use_tqdm=self.progress)
        results = []
        for output in outputs:
            completions = [
                make_completion(
                    self.tokenizer,
                    sample.token_ids,
                    [step[token].logprob for step, token in zip(sample.logprobs, sample.token_ids)],
                    sample.finish_reason,
                    sampling.stop,
                )
                for sample in sorted(output.outputs, key=lambda sample: sample.index)
            ]
            results.append(_repeat(completions[0], n) if greedy else completions)
        return results

    def _beam_search(self, token_prompts: list[dict], n: int, sampling: SamplingParams) -> list[list[Completion]]:
        if n > sampling.num_beams:
            raise ValueError(
                f"beam search returns at most num_beams={sampling.num_beams} sequences per prompt, {n} asked for"
            )
        from vllm.sampling_params import BeamSearchParams  # optional extra (llmq[vllm])

        params = BeamSearchParams(
            beam_width=sampling.num_beams, max_tokens=sampling.max_new_tokens, length_penalty=0.0
        )
        outputs = self.llm.beam_search(token_prompts, params, use_tqdm=self.progress)
        eos = self.tokenizer.eos_token_id
        results = []
        for prompt, output in zip(token_prompts, outputs):
            completions = []
            for beam in output.sequences[:n]:
                ids = beam.tokens[len(prompt["prompt_token_ids"]) :]
                logprobs = [step[token].logprob for step, token in zip(beam.logprobs, ids)]
                length = self._stop_length(ids, sampling.stop)
                finish = "stop" if length < len(ids) or (ids and ids[-1] == eos) else "length"
                completions.append(
                    make_completion(self.tokenizer, ids[:length], logprobs[:length], finish, sampling.stop)
                )
            results.append(completions)
        return results

    def _stop_length(self, ids: list[int], stop: tuple[str, ...]) -> int:
        """Tokens up to the one that completes the first stop string (beam search cannot stop on strings)."""
        if stop and any(s in self.tokenizer.decode(ids, skip_special_tokens=True) for s in stop):
            for length in range(1, len(ids) + 1):
                if any(s in self.tokenizer.decode(ids[:length], skip_special_tokens=True) for s in stop):
                    return length
        return len(ids)

    def load_weights(self, model_or_state_dict) -> None:
        """Copy a training model's current weights into the engine (online RL: sync, then sample).

        Takes a ``state_dict`` (HF checkpoint names) or a model (PEFT adapters merged for the copy).
        Every tensor of the checkpoint must be there: vLLM fuses q/k/v and gate/up projections, and
        a half-given fused weight would be left uninitialised.

        How: ``LLM.collective_rpc("reload_weights", ...)`` runs vLLM's in-place, layer-wise reload on
        the worker (``model.load_weights`` between ``initialize_layerwise_reload`` and
        ``finalize_layerwise_reload``), then the prefix cache is reset. TRL's colocate mode instead
        calls ``llm.llm_engine.model_executor.driver_worker.model_runner.model.load_weights(...)``
        directly; on vLLM's CPU backend that is not enough, because after loading, linear layers
        are repacked into oneDNN / SGL kernel formats and their ``weight`` parameters emptied, so
        the repacking must run again — which ``reload_weights`` does.
        """
        with named_weights(model_or_state_dict) as weights:
            if self._expected_weights is not None:
                missing = self._expected_weights - {name for name, _ in weights}
                if missing:
                    raise ValueError(
                        f"load_weights needs every weight of the checkpoint; missing {len(missing)}, e.g. "
                        f"{sorted(missing)[:3]}"
                    )
            self.llm.collective_rpc(
                "reload_weights", kwargs={"weights_iterator": weights, "is_checkpoint_format": True}
            )
        self.llm.reset_prefix_cache()

    def close(self) -> None:
        """Shut vLLM down and release its memory (and, in-process, its distributed state)."""
        llm = self.__dict__.pop("llm", None)
        if llm is None:
            return
        with contextlib.suppress(Exception):
            llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()
        from vllm.distributed.parallel_state import cleanup_dist_env_and_memory  # optional extra (llmq[vllm])

        cleanup_dist_env_and_memory()

    def __enter__(self) -> VLLMEngine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class VLLMServerEngine:
    """A client of running ``vllm serve`` servers (OpenAI-compatible ``/v1/completions``), built on the
    ``openai`` package: pooled connections, retries with backoff, timeouts, ``Authorization``.

    Prompts are rendered and tokenised here (the servers get token ids), each prompt is one request
    (sent ``max_concurrency`` at a time, so a server batches them; with several servers request
    ``i`` goes to server ``i mod len(servers)``) with ``n`` samples, the seed :func:`request_seed`,
    ``logprobs=0`` (the sampled tokens' log-probs: raw, before temperature, unless the server was
    started with another ``--logprobs-mode``) and vLLM's ``return_token_ids``. A CPU server
    (vllm-cpu 0.32) needs ``--no-enable-chunked-prefill`` for seeded requests: see
    :class:`VLLMEngine`, which turns chunked prefill off on CPUs for the same reason.

    Args:
        base_url: the server, e.g. ``http://127.0.0.1:8000``, or a list of servers of the same model.
        tokenizer: a tokenizer, or a name/path to load one from; by default the served model's.
        model: the served model name; by default the server's first (``GET /v1/models``).
        expected_model: when given, the served model must be this one (a name, or a directory the
            server was started with): otherwise :class:`~llmq.errors.UserError` names both.
        api_key: the servers' ``--api-key``, sent as ``Authorization: Bearer``.
        timeout: seconds per request; reaching a server at start-up gets ``CONNECT_TIMEOUT`` and no retry.
        max_retries: retries of a request that failed to connect, timed out or got a 5xx/429 answer.

    A server that cannot be reached, at start-up or later, is a :class:`~llmq.errors.UserError`
    naming its URL.
    """

    CONNECT_TIMEOUT = 10.0

    def __init__(
        self,
        base_url: str | list[str] = "http://127.0.0.1:8000",
        *,
        tokenizer=None,
        model: str | None = None,
        expected_model: str | None = None,
        api_key: str | None = None,
        timeout: float = 600.0,
        max_retries: int = 2,
        max_concurrency: int = 8,
    ) -> None:
        self.servers = [url.rstrip("/") for url in ([base_url] if isinstance(base_url, str) else base_url)]
        # A server started without --api-key accepts any key; the SDK needs one to send.
        self.clients = [
            openai.OpenAI(base_url=f"{url}/v1", api_key=api_key or "EMPTY", timeout=timeout, max_retries=max_retries)
            for url in self.servers
        ]
        self.max_concurrency = max_concurrency
        self._weights_dir: tempfile.TemporaryDirectory | None = None
        self._transfers: list | None = None  # NCCL weight-transfer groups, one per server (broadcast_weights)
        served = [
            [
                entry.id
                for entry in self._call(
                    url, client.with_options(timeout=self.CONNECT_TIMEOUT, max_retries=0).models.list
                )
            ]
            for url, client in zip(self.servers, self.clients)
        ]
        self.model = model or served[0][0]
        for url, names in zip(self.servers, served):
            if expected_model is not None and not any(_same_model(name, expected_model) for name in names):
                raise UserError(
                    f"vLLM server {url} serves {', '.join(names)}, not the model '{expected_model}' of this run"
                )
            if self.model not in names:
                raise UserError(
                    f"vLLM server {url} serves {', '.join(names)}, not '{self.model}' as {self.servers[0]} does"
                )
        if tokenizer is None or isinstance(tokenizer, str):
            tokenizer = load_tokenizer(tokenizer or self.model)
        self.tokenizer = tokenizer

    @staticmethod
    def _call(url: str, request, **arguments):
        """``request(**arguments)``; a server that cannot be reached is a UserError naming ``url``."""
        try:
            return request(**arguments)
        except openai.APIConnectionError as error:  # refused, reset, timed out (after the retries), unknown host
            reason = " ".join(str(error.__cause__ or error).split())
            raise UserError(
                f"vLLM server {url} cannot be reached ({reason}); start it (e.g. `vllm serve MODEL`) or fix "
                "vllm_server_url, then run the same command again"
            ) from None
        except openai.APIStatusError as error:
            if error.status_code == 404 and not error.request.url.path.startswith("/v1/"):
                raise UserError(
                    f"vLLM server {url} has no endpoint {error.request.url.path}: weight sync needs the server "
                    "started with `llmq serve --enable_weight_sync` (VLLM_SERVER_DEV_MODE=1)"
                ) from None
            raise RuntimeError(f"vLLM server {url}: HTTP {error.status_code}: {str(error.message)[:500]}") from error

    def load_weights(self, model_or_state_dict, sync_dir: str | Path | None = None) -> None:
        """Serve these weights (a model, PEFT adapters merged, or a state dict in Hugging Face names):
        written as one safetensors file to ``sync_dir``, reloaded in place by every server, whose
        prefix cache is then dropped.

        ``sync_dir`` must be a folder the servers can read: by default a temporary folder on this
        machine (servers on other machines need a shared one). A tied output layer is written under
        its own name too (``lm_head.weight``): vLLM's in-place reload loads it from nowhere else.
        Uses vLLM's development endpoints ``/collective_rpc`` (the workers' ``reload_weights``) and
        ``/reset_prefix_cache``: start the servers with ``VLLM_SERVER_DEV_MODE=1``.
        """
        with named_weights(model_or_state_dict) as named:  # copied inside: PEFT adapters are merged only here
            weights = _with_output_layer({name: tensor.to("cpu", copy=True).contiguous() for name, tensor in named})
        if sync_dir is None and self._weights_dir is None:  # removed when this engine is
            self._weights_dir = tempfile.TemporaryDirectory(prefix="llmq-weights-")
        directory = Path(sync_dir if sync_dir is not None else self._weights_dir.name)
        directory.mkdir(parents=True, exist_ok=True)
        partial = directory / "model.safetensors.partial"
        save_file(weights, str(partial))
        partial.replace(directory / "model.safetensors")  # a server never reads a half-written file
        rpc = {"method": "reload_weights", "kwargs": {"weights_path": str(directory.resolve())}}
        for server in range(len(self.servers)):
            self._post(server, "/collective_rpc", rpc)
        self._reset_prefix_caches()

    def broadcast_weights(self, model_or_state_dict, master_address: str | None = None) -> None:
        """Serve these weights (as :meth:`load_weights` takes them) by sending them from this process's GPU
        to every server's workers over NCCL: vLLM's weight-transfer engine, which TRL's server mode also
        uses; no file and no copy through the CPU.

        The servers must run on GPUs (other GPUs than this process's: NCCL joins distinct devices) and be
        started with ``llmq serve --enable_weight_sync``, which adds ``--weight-transfer-config
        '{"backend": "nccl"}'``. The first call joins one NCCL group per server, this process as rank 0 and
        the server's workers after it, at ``master_address`` (default: the address this machine reaches
        the server from) on a free port; later calls reuse the groups.
        """
        from vllm.distributed.weight_transfer.base import ParamMeta, WeightSource  # optional extra: vLLM

        class Weights(WeightSource):
            def __init__(self, named: list[tuple[str, object]]) -> None:
                self.named = named

            def metadata(self) -> list[ParamMeta]:
                return [ParamMeta(name, tensor.dtype, tuple(tensor.shape)) for name, tensor in self.named]

            def __iter__(self):
                return iter(self.named)

        with named_weights(model_or_state_dict) as named:  # PEFT adapters stay merged while the weights go out
            weights = _with_output_layer(dict(named))
            if any(tensor.device.type != "cuda" for tensor in weights.values()):
                raise ValueError("broadcast_weights sends CUDA tensors over NCCL; on a CPU use load_weights")
            source = Weights(list(weights.items()))
            if self._transfers is None:
                self._transfers = [
                    self._join_transfer_group(server, source, master_address) for server in range(len(self.servers))
                ]
            for transfer in self._transfers:
                transfer.source = source
                transfer.send_weights()
        self._reset_prefix_caches()

    def _join_transfer_group(self, server: int, source, master_address: str | None):
        """The trainer side of an NCCL group with the workers of server number ``server`` (vLLM's
        ``NCCLTrainerWeightTransferEngine``, driven through the server's weight-transfer endpoints)."""
        from vllm.distributed.weight_transfer.nccl_engine import (  # optional extra: vLLM
            NCCLTrainerInitInfo,
            NCCLTrainerWeightTransferEngine,
        )

        engine = self

        class Endpoints:  # vLLM's VLLMWeightSyncClient protocol, over this engine's authenticated client
            def init_weight_transfer_engine(self, init_info: dict) -> None:
                engine._post(server, "/init_weight_transfer_engine", {"init_info": init_info})

            def start_weight_update(self) -> None:
                engine._post(server, "/start_weight_update")

            def update_weights(self, update_info: dict) -> None:
                engine._post(server, "/update_weights", {"update_info": update_info})

            def finish_weight_update(self, weight_version: str | None = None) -> None:
                engine._post(
                    server,
                    "/finish_weight_update",
                    None if weight_version is None else {"weight_version": weight_version},
                )

        url = self.servers[server]
        client = self.clients[server].with_options(base_url=url)
        workers = self._call(url, client.get, path="/get_world_size", cast_to=httpx.Response).json()["world_size"]
        if master_address is None:  # the address of this machine on the route to the server
            host = httpx.URL(url).host
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
                probe.connect((host, 9))  # UDP: no packet is sent
                master_address = probe.getsockname()[0]
        with socket.socket() as probe:
            probe.bind(("", 0))
            port = probe.getsockname()[1]
        info = NCCLTrainerInitInfo(master_address=master_address, master_port=port, world_size=workers + 1, rank=0)
        return NCCLTrainerWeightTransferEngine.trainer_init(info, client=Endpoints(), source=source)

    def _post(self, server: int, path: str, body: dict | None = None) -> httpx.Response:
        """POST to one of vLLM's own (non-OpenAI) endpoints of server number ``server``."""
        url = self.servers[server]
        return self._call(
            url, self.clients[server].with_options(base_url=url).post, path=path, body=body, cast_to=httpx.Response
        )

    def _reset_prefix_caches(self) -> None:
        """After a weight sync: no server reuses KV cache computed with the old weights."""
        for server in range(len(self.servers)):
            self._post(server, "/reset_prefix_cache")

    def close(self) -> None:
        """Close the connections and the weights folder; the servers keep running."""
        for client in self.clients:
            client.close()
        if self._weights_dir is not None:
            self._weights_dir.cleanup()
            self._weights_dir = None

    def render(self, prompt: Prompt) -> str:
        return render(self.tokenizer, prompt)

    def generate(
        self, prompts: list[Prompt], n: int = 1, sampling: SamplingParams = SamplingParams()
    ) -> list[list[Completion]]:
        if sampling.num_beams > 1:
            raise ValueError("VLLMServerEngine does not do beam search; use VLLMEngine or HFEngine")
        greedy = sampling.temperature == 0

        def one(index: int, prompt: Prompt) -> list[Completion]:
            vllm_options = {"return_token_ids": True, "skip_special_tokens": True}
            if sampling.top_k and not greedy:
                vllm_options["top_k"] = sampling.top_k
            server = index % len(self.servers)
            response = self._call(
                self.servers[server],
                self.clients[server].completions.create,
                model=self.model,
                prompt=encode(self.tokenizer, prompt),
                n=1 if greedy else n,
                max_tokens=sampling.max_new_tokens,
                temperature=sampling.temperature,
                top_p=1.0 if greedy else sampling.top_p,
                seed=request_seed(sampling.seed, index),
                logprobs=0,
                stop=list(sampling.stop) or None,
                extra_body=vllm_options,
            )
            completions = [
                make_completion(
                    self.tokenizer,
                    choice.token_ids,
                    choice.logprobs.token_logprobs,
                    choice.finish_reason,
                    sampling.stop,
                )
                for choice in sorted(response.choices, key=lambda choice: choice.index)
            ]
            return _repeat(completions[0], n) if greedy else completions

        with concurrent.futures.ThreadPoolExecutor(max_workers=self.max_concurrency) as pool:
            return list(pool.map(one, range(len(prompts)), prompts))


def _with_output_layer(weights: dict) -> dict:
    """``weights`` with a tied output layer written under its own name too (``lm_head.weight``): a server's
    in-place reload and its weight transfer load it from nowhere else. A copy: safetensors files hold no
    tensors that share memory."""
    if "lm_head.weight" not in weights and "model.embed_tokens.weight" in weights:
        weights["lm_head.weight"] = weights["model.embed_tokens.weight"].clone()
    return weights


def _same_model(served: str, expected: str) -> bool:
    """Whether a served model name is ``expected``: the same name, or the same directory."""
    if served == expected:
        return True
    return Path(served).is_dir() and Path(expected).is_dir() and Path(served).resolve() == Path(expected).resolve()
