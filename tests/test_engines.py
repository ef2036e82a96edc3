"""The engine key of the commands that generate: hf, vllm, vllm_server.

What needs no vLLM runs here (the keys, the combinations they refuse, a server that is not there);
the tests against a real ``llmq serve`` are in tests/test_vllm_engine.py.
"""

import importlib.util
import json
import socket
import time

import pytest

from llmq.cli import main
from llmq.evaluation import EvalConfig
from llmq.rollout.engines import EngineConfig, VLLMSettings
from llmq.rollout.serve import ServeConfig, serve_command


@pytest.mark.parametrize(
    "argv, message",
    [
        (["eval", "--engine", "vllm", "--decoding", "guided", "--guide_model", "tiny-llama"], "needs engine hf"),
        (["eval", "--engine", "vllm_server", "--decoding", "beam"], "no beam search"),
        (["eval", "--engine", "vllm_server", "--vllm_server_url", "127.0.0.1:8000"], "key 'vllm_server_url'"),
        (["eval", "--engine", "vllm", "--vllm_gpu_memory_utilization", "1.5"], "key 'vllm_gpu_memory_utilization'"),
        (["eval", "--engine", "sglang"], "key 'engine'"),
        (["train", "--method", "digiq", "--engine", "vllm"], "method digiq runs on transformers"),
        (["train", "--method", "shiq", "--engine", "vllm", "--dataset_path", "."], "set build_task or engine hf"),
    ],
)
def test_an_engine_the_command_cannot_use_is_one_line_naming_both_keys(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err and "Traceback" not in err


def test_every_generating_command_documents_the_engine_key(capsys):
    for argv in (["eval", "--help"], ["generate", "--help"], ["train", "--method", "qvm", "--help"]):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 0 and "--engine {hf,vllm,vllm_server}" in capsys.readouterr().out


def test_reports_record_the_engine_but_not_the_server_or_its_key():
    record = EvalConfig(engine="vllm_server", vllm_api_key="secret").decoding_record()
    assert record["engine"] == "vllm_server" and "secret" not in str(record) and "vllm_server_url" not in record
    assert EngineConfig().engine == "hf"
    assert (
        "vllm_api_key" not in EngineConfig(vllm_api_key="secret").settings_record()
    )  # what stages.json and datasets keep


@pytest.mark.slow
def test_an_unreachable_server_is_one_line_naming_its_url_within_15_seconds(tmp_path, data_dir, capsys):
    with socket.socket() as probe:  # a free port nobody listens on
        probe.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{probe.getsockname()[1]}"
    started = time.monotonic()
    argv = ["eval", "--model_name_or_path", "tiny-llama", "--data_dir", str(data_dir), "--limit", "1"]
    assert main([*argv, "--engine", "vllm_server", "--vllm_server_url", url, "--output_dir", str(tmp_path)]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]  # after the model's loading bar
    assert time.monotonic() - started < 15
    assert last.startswith("llmq eval: error: vLLM server " + url) and "cannot be reached" in last


@pytest.mark.slow
def test_engine_vllm_without_vllm_installed_is_one_line_saying_how_to_get_it(tmp_path, data_dir, capsys):
    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vLLM is installed here: tests/test_vllm_engine.py runs it")
    argv = ["eval", "--model_name_or_path", "tiny-llama", "--data_dir", str(data_dir), "--limit", "1"]
    assert main([*argv, "--engine", "vllm", "--output_dir", str(tmp_path)]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "engine vllm needs vLLM" in last and "llmq[vllm]" in last and "vllm_server" in last


def test_llmq_serve_starts_vllms_server_with_what_the_client_relies_on():
    config, settings = ServeConfig(port=8123, enable_weight_sync=True), VLLMSettings(vllm_max_model_len=512)
    command, env = serve_command(config, settings, "/models/m", "float32", cpu=True, vllm_args=["--seed", "0"])
    assert command[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    expected = {"--model": "/models/m", "--dtype": "float32", "--port": "8123", "--host": "127.0.0.1"}
    assert {flag: command[command.index(flag) + 1] for flag in expected} == expected
    assert command[command.index("--max-model-len") + 1] == "512"
    assert {"--enforce-eager", "--no-enable-chunked-prefill", "--enable-prefix-caching"} <= set(command)
    assert command[-2:] == ["--seed", "0"]  # vLLM options after `--` come last, so they win
    assert env["VLLM_SERVER_DEV_MODE"] == "1" and "--weight-transfer-config" not in command  # CPU: reload only
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "2"

    gpu, _ = serve_command(config, settings, "/models/m", "bfloat16", cpu=False, vllm_args=[])
    assert "--enforce-eager" not in gpu and "--no-enable-chunked-prefill" not in gpu
    assert json.loads(gpu[gpu.index("--weight-transfer-config") + 1]) == {"backend": "nccl"}

    plain, plain_env = serve_command(ServeConfig(), VLLMSettings(), "/models/m", "float32", cpu=True, vllm_args=[])
    assert "VLLM_SERVER_DEV_MODE" not in plain_env and "--api-key" not in plain  # dev endpoints only when asked for
    keyed, _ = serve_command(ServeConfig(api_key="k"), VLLMSettings(), "/models/m", "float32", cpu=True, vllm_args=[])
    assert keyed[keyed.index("--api-key") + 1] == "k"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["serve", "--port", "70000"], "key 'port'"),
        (["serve", "no/such/./model"], "unknown model"),
        (["serve", "tiny-llama", "--vllm_tensor_parallel_size", "0"], "key"),
        (["serve", "--nosuchkey", "1"], "nosuchkey"),
    ],
)
def test_bad_llmq_serve_input_is_one_line(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("llmq serve: error:") and message in err and "\n" not in err
