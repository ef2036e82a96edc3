"""Benchmark: best-of-N through the command a user types, once per engine, same questions and seeds:

    llmq eval --task gsm8k --limit 16 --decoding best_of_n --num_candidates 8 --temperature 0.7 --engine ENGINE

    python bench/engines_best_of_n.py                                 # hf, vllm, vllm_server; the embedded model
    python bench/engines_best_of_n.py --engines hf vllm --max_new_tokens 256 --model DIR

Each engine runs the same `llmq eval` command in a fresh process; for `vllm_server` the script first
starts `llmq serve` of the same model (on a free loopback port), waits until it answers, and stops it
afterwards. Per engine: generation tokens/s from report.json (the tokens of all 8 candidates over the
time spent in batches: model loading and server start-up excluded, and reported apart as the command's
end-to-end seconds), peak memory (the largest sum of RSS over the command's processes, sampled every
0.2 s, plus the server's processes for vllm_server), and accuracy. Prints ratios against hf measured in
the same run and writes JSON (default outputs/bench/engines_best_of_n.json). Run it on an idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
ENGINES = ("hf", "vllm", "vllm_server")


class PeakMemory:
    """The largest total RSS of some process trees, sampled in a thread while the block runs."""

    def __init__(self, *pids: int) -> None:
        self.roots, self.peak, self._stop = [psutil.Process(pid) for pid in pids], 0, threading.Event()

    def _sample(self) -> None:
        while not self._stop.wait(0.2):
            total = 0
            for root in self.roots:
                try:
                    processes = [root, *root.children(recursive=True)]
                except psutil.NoSuchProcess:
                    continue
                for process in processes:
                    try:
                        total += process.memory_info().rss
                    except psutil.NoSuchProcess:
                        pass
            self.peak = max(self.peak, total)

    def __enter__(self) -> PeakMemory:
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, port: int, log: Path, timeout: float = 300) -> subprocess.Popen:
    command = [sys.executable, "-m", "llmq.cli", "serve", model, "--port", str(port)]
    with open(log, "wb") as output:  # its own process group: stopping it stops its engine processes too
        server = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            sys.exit(f"llmq serve exited with {server.returncode}:\n{log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return server
        except OSError:
            time.sleep(1)
    stop_server(server)
    sys.exit(f"llmq serve was not ready within {timeout:.0f} s:\n{log.read_text()[-2000:]}")


def stop_server(server: subprocess.Popen) -> None:
    os.killpg(server.pid, signal.SIGTERM)
    try:
        server.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()


def run_engine(engine: str, args: argparse.Namespace, work: Path) -> dict:
    output_dir = work / engine
    command = [sys.executable, "-m", "llmq.cli", "eval", "--model_name_or_path", args.model, "--task", "gsm8k"]
    command += ["--limit", str(args.limit), "--decoding", "best_of_n", "--num_candidates", str(args.num_candidates)]
    command += ["--temperature", str(args.temperature), "--max_new_tokens", str(args.max_new_tokens)]
    command += ["--seed", str(args.seed), "--engine", engine, "--output_dir", str(output_dir)]
    if args.data_dir:
        command += ["--data_dir", args.data_dir]
    server, roots = None, []
    if engine == "vllm_server":
        port = free_port()
        started = time.perf_counter()
        server = start_server(args.model, port, work / "server.log")
        server_start_s = time.perf_counter() - started
        command += ["--vllm_server_url", f"http://127.0.0.1:{port}"]
        roots.append(server.pid)
    try:
        started = time.perf_counter()
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        with PeakMemory(process.pid, *roots) as memory:
            output, _ = process.communicate()
        seconds = time.perf_counter() - started
    finally:
        if server is not None:
            stop_server(server)
    if process.returncode != 0:
        sys.exit(f"{engine}: `{' '.join(command)}` failed:\n{output[-3000:]}")
    report = json.loads((output_dir / "report.json").read_text())
    result = {
        "engine": engine,
        "command": command[2:],
        "generated_tokens": report["generated_tokens"],
        "generation_s": report["wall_time_s"],
        "tokens_per_s": report["generated_tokens"] / report["wall_time_s"],
        "end_to_end_s": seconds,
        "peak_rss_gib": memory.peak / 2**30,
        # the decoding's own metric comes first (best_of_n), then the answer-format rate
        "accuracy": next(iter(report["metrics"].values()))["mean"],
        "metrics": report["metrics"],
    }
    if server is not None:
        result["server_start_s"] = server_start_s
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--engines", nargs="+", choices=ENGINES, default=list(ENGINES))
    local_copy = REPO.parent / "shared" / "data"  # as the Makefile and the tests find it
    parser.add_argument(
        "--data_dir", default=os.environ.get("LLMQ_DATA_DIR") or (str(local_copy) if local_copy.is_dir() else None)
    )
    parser.add_argument("--limit", type=int, default=16, help="GSM8K test questions")
    parser.add_argument("--num_candidates", type=int, default=8, help="the N of best-of-N")
    parser.add_argument("--max_new_tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default="outputs/bench/engines_best_of_n.json")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="llmq-bench-") as work:
        results = {}
        for engine in args.engines:
            print(f"running {engine} ...", flush=True)
            results[engine] = run_engine(engine, args, Path(work))
    baseline = results.get("hf")
    ratios = (
        {
            name: {key: r[key] / baseline[key] for key in ("tokens_per_s", "end_to_end_s", "peak_rss_gib")}
            for name, r in results.items()
            if name != "hf"
        }
        if baseline
        else {}
    )
    import torch
    import vllm

    record = {
        "settings": vars(args),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {os.cpu_count()} cores",
        "machine": platform.platform(),
        "vllm_version": vllm.__version__,
        "load_average_after": os.getloadavg(),
        "results": results,
        "over_hf": ratios,
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(record, indent=2) + "\n")
    print(
        f"llmq eval --decoding best_of_n: {args.limit} GSM8K questions x {args.num_candidates} candidates, "
        f"{args.max_new_tokens} new tokens max, T={args.temperature}, {args.model}, {record['device']}"
    )
    print(f"{'engine':13}{'tokens/s':>10}{'tokens':>8}{'gen s':>8}{'total s':>9}{'peak RSS GiB':>14}{'accuracy':>10}")
    for name, r in results.items():
        print(
            f"{name:13}{r['tokens_per_s']:10.1f}{r['generated_tokens']:8d}{r['generation_s']:8.1f}"
            f"{r['end_to_end_s']:9.1f}{r['peak_rss_gib']:14.2f}{r['accuracy']:10.3f}"
        )
    for name, ratio in ratios.items():
        print(
            f"{name + '/hf':13}{ratio['tokens_per_s']:10.2f}{'':8}{'':8}{ratio['end_to_end_s']:9.2f}"
            f"{ratio['peak_rss_gib']:14.2f}"
        )
    print(f"report: {args.output}")


if __name__ == "__main__":
    main()
