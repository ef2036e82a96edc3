"""Pieces shared by the task rewards: math-verify behind a wall-clock timeout, TRL completion text.

math-verify's own timeouts use ``signal.alarm``, which raises off the main thread, and no timeout
inside this process can stop sympy when it holds the GIL (``\\boxed{9^{9^{9^{9}}}}`` computes a
huge integer in C and freezes every thread, for hours).  So :func:`math_equal` sends each
comparison to one long-lived worker process, with math-verify's timeouts disabled there, and kills
and restarts that worker when a comparison overruns.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import select
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

# The first start imports sympy; generous so a loaded machine does not fail it.
_STARTUP_TIMEOUT_S = 120.0


class _VerifyWorker:
    """A child process that runs ``verify(parse(gold), parse(prediction))``, one request at a time."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._process: subprocess.Popen | None = None

    def equal(self, gold: str, prediction: str, timeout: float) -> bool:
        with self._lock:
            if self._process is None or self._process.poll() is not None:
                self._start()
            process = self._process
            try:
                process.stdin.write(json.dumps([gold, prediction]) + "\n")
                process.stdin.flush()
            except OSError:  # the worker died since the last call
                self.close()
                return False
            ready, _, _ = select.select([process.stdout], [], [], timeout)
            answer = process.stdout.readline() if ready else ""
            if answer not in ("0\n", "1\n"):
                # Overran (or crashed): its late answer must never be read as the next call's.
                self.close()
                return False
            return answer == "1\n"

    def _start(self) -> None:
        package_parent = str(Path(__file__).resolve().parents[1])
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_parent, env.get("PYTHONPATH")) if p)
        self._process = subprocess.Popen(
            [sys.executable, "-c", "from reward_models.common import _serve; _serve()"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            encoding="utf-8",
            bufsize=1,
            env=env,
        )
        ready, _, _ = select.select([self._process.stdout], [], [], _STARTUP_TIMEOUT_S)
        if not ready or self._process.stdout.readline() != "ready\n":
            self.close()
            raise RuntimeError(
                "the math-verify worker process did not start (its stderr is above); is math-verify installed?"
            )

    def close(self) -> None:
        if self._process is not None:
            self._process.kill()
            self._process.wait()
            self._process = None


def _serve() -> None:
    """Worker loop: one JSON ``[gold, prediction]`` per stdin line, ``1``/``0`` per stdout line."""
    channel = os.fdopen(os.dup(1), "w", encoding="utf-8")
    os.dup2(2, 1)  # a stray print from sympy must not corrupt the protocol
    logging.getLogger("math_verify").setLevel(logging.ERROR)  # its "timeout disabled" warning: the parent enforces one
    from math_verify import parse, verify

    channel.write("ready\n")
    channel.flush()
    for line in sys.stdin:
        gold, prediction = json.loads(line)
        try:
            ok = verify(
                parse(gold, parsing_timeout=None), parse(prediction, parsing_timeout=None), timeout_seconds=None
            )
        except Exception:
            ok = False
        channel.write("1\n" if ok else "0\n")
        channel.flush()


_worker = _VerifyWorker()


def _fresh_worker_after_fork() -> None:
    # A forked child must not share the parent's pipes, nor inherit a lock held by another thread.
    global _worker
    _worker = _VerifyWorker()


os.register_at_fork(after_in_child=_fresh_worker_after_fork)
atexit.register(lambda: _worker.close())  # late-bound: a forked child closes its own worker, not its parent's


def math_equal(gold: str, prediction: str, timeout: float = 5.0) -> bool:
    """math-verify equivalence ``verify(parse(gold), parse(prediction))``; False after ``timeout`` seconds.

    Both strings go to ``math_verify.parse`` as they are: plain numbers (``18.00``, ``1/2``,
    ``1,000``) parse bare, LaTeX needs delimiters (``$...$`` or ``\\boxed{...}``).  Safe to call
    from any thread; calls from several threads are served one at a time.
    """
    return _worker.equal(gold, prediction, timeout)


def completion_text(completion: Any) -> str:
    """Text of a TRL completion: a string, or a conversational list of messages (last assistant turn)."""
    if isinstance(completion, str):
        return completion
    replies = [message for message in completion if message.get("role", "assistant") == "assistant"]
    return replies[-1]["content"] if replies else ""
