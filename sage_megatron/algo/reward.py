"""Math reward: last ``\\boxed{...}`` of a response vs the ground truth, by math-verify (sympy).

    math_reward(response, ground_truth) -> 1.0 | 0.0
    batch_math_reward([(response, ground_truth), ...]) -> [1.0 | 0.0, ...]

Bounds (no model output can hang or exhaust the trainer):

* extraction runs here, in linear time, and gives up on an answer longer than ``max_answer_chars``
  (default 1,000: final answers are short; a megabyte string or 10k nested braces scores 0.0
  without ever reaching sympy);
* verification runs in ONE persistent worker subprocess (a clean interpreter that imports only
  math-verify), one pair at a time, under a wall-clock limit ``timeout_s`` per pair (default 5 s)
  and an address-space cap ``memory_bytes`` (RLIMIT_AS, default 1 GiB). A pair that runs past the
  limit scores 0.0, the worker is killed and restarted (about 1 s); a MemoryError scores 0.0 and the
  worker restarts itself;
* inside the worker math-verify's own time limits are also set (``parse``/``verify`` use
  ``signal.alarm``, whole seconds) so the common slow cases (``9^{9^{9^9}}``) come back as False
  without a restart.

Why a subprocess: math-verify 0.9.0 implements its time limits with ``signal.alarm``, which works only
in the main thread of the main interpreter. Called from any other thread (a Ray actor's thread pool,
a reward thread) ``parse`` and ``verify`` RAISE ``ValueError`` ("doesn't support threaded
environment") unless the limits are disabled, and disabled limits mean nothing stops sympy. In our
worker every call runs in its main thread, and the parent's wall clock backs it up: the alarm only
fires between Python bytecodes, so a long C-level big-integer operation is stopped by the kill.

Exceptions and time-outs score 0.0 and never raise. The one error that does raise is a worker that
cannot start at all (math-verify not installed): that is a broken environment, not a bad answer.
"""
from __future__ import annotations

import atexit
import json
import math
import os
import re
import select
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import Sequence

from sage_megatron.procs import die_with_parent

DEFAULT_TIMEOUT_S = 5.0
DEFAULT_MEMORY_BYTES = 1 << 30
DEFAULT_MAX_ANSWER_CHARS = 1_000
_BOX_COMMANDS = ("\\boxed", "\\fbox")


# ----------------------------------------------------------------------------- extraction


def extract_last_boxed(text: str, *, max_chars: int = DEFAULT_MAX_ANSWER_CHARS) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``, or ``\\boxed 5``) in ``text``.

    Braces are matched (``\\{`` and ``\\}`` are literal braces and do not count). Returns None when
    there is no box, the last box is never closed, or its content is longer than ``max_chars``.
    Linear in ``len(text)`` and in ``max_chars``.
    """
    start = max(text.rfind(cmd) for cmd in _BOX_COMMANDS)
    if start < 0:
        return None
    cmd = next(c for c in _BOX_COMMANDS if text.startswith(c, start))
    i = start + len(cmd)
    j = i
    while j < len(text) and text[j] == " ":
        j += 1
    if j < len(text) and text[j] == "{":
        return _braced(text, j, max_chars=max_chars)
    if j > i:  # "\boxed 42$": the content runs to the next "$" or line end
        end = j
        limit = min(len(text), j + max_chars + 1)
        while end < limit and text[end] not in "$\n":
            end += 1
        content = text[j:end].strip()
        return content if content and end - j <= max_chars else None
    return None


def _braced(text: str, open_pos: int, *, max_chars: int) -> str | None:
    """The text between ``text[open_pos] == "{"`` and its matching ``}``; None if unclosed/too long."""
    depth = 0
    k = open_pos
    limit = min(len(text), open_pos + max_chars + 2)
    while k < limit:
        ch = text[k]
        if ch == "\\":
            k += 2  # an escaped character (\{, \}, \\) never opens or closes a group
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return text[open_pos + 1:k]
        k += 1
    return None


def integer_reward(response: str, answer: str) -> float:
    """1.0 if the last ``\\boxed{}`` holds an integer equal to ``answer``, else 0.0; pure and fast.

    For tasks whose answers are integers (the toy task): integer equality is what math-verify concludes
    for them ("02" == "2", " 2 " == "2"), checked in tests/tasks/test_toy_task.py.
    """
    got = extract_last_boxed(response)
    if got is None:
        return 0.0
    got = got.strip()
    if not re.fullmatch(r"[+-]?\d{1,6}", got):
        return 0.0
    return float(int(got) == int(answer))


# ----------------------------------------------------------------------------- worker (child side)


def _worker_main(memory_bytes: int, inner_timeout: int) -> None:
    """The verification loop: one JSON request per stdin line, one JSON reply per line."""
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != here]  # no shadowing by rl/*.py
    import resource

    if memory_bytes > 0:
        resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    die_with_parent()
    reply = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8")
    os.dup2(2, 1)  # stray prints (sympy, math-verify) cannot corrupt the protocol
    try:
        import logging

        logging.disable(logging.CRITICAL)  # math-verify logs whole inputs on time-out
        from math_verify import parse, verify
        from math_verify.errors import TimeoutException
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which raises
        reply.write(json.dumps({"ready": False, "error": f"{type(e).__name__}: {e}"}) + "\n")
        return
    reply.write(json.dumps({"ready": True}) + "\n")

    gold_cache: dict[str, list] = {}

    def gold(truth: str) -> list:
        if truth not in gold_cache:
            if len(gold_cache) > 4096:
                gold_cache.clear()
            parsed = parse("\\boxed{" + truth + "}", parsing_timeout=inner_timeout)
            gold_cache[truth] = parsed or parse(truth, parsing_timeout=inner_timeout)
        return gold_cache[truth]

    for line in sys.stdin:
        out: dict = {"ok": False}
        try:
            req = json.loads(line)
            target = parse("\\boxed{" + req["a"] + "}", parsing_timeout=inner_timeout)
            out["ok"] = bool(target) and bool(verify(gold(req["g"]), target, timeout_seconds=inner_timeout))
        except MemoryError:
            out = {"ok": False, "error": "MemoryError", "exit": True}
        except (Exception, TimeoutException) as e:  # noqa: BLE001 - any failure scores 0
            out = {"ok": False, "error": type(e).__name__}
        reply.write(json.dumps(out) + "\n")
        if out.get("exit"):
            return


# ----------------------------------------------------------------------------- worker (parent side)


@dataclass
class VerifierStats:
    """Counters since the verifier was made (for logs)."""

    pairs: int = 0           # pairs scored
    no_box: int = 0          # no (closed, short enough) box: 0.0 without the worker
    exact: int = 0           # answer string == ground truth: 1.0 without the worker
    timeouts: int = 0        # pairs killed at timeout_s
    errors: int = 0          # exceptions inside math-verify (scored 0.0)
    restarts: int = 0        # worker (re)starts after the first


class MathVerifier:
    """A persistent, bounded math-verify worker. Thread-safe; one pair in flight at a time."""

    def __init__(self, *, timeout_s: float = DEFAULT_TIMEOUT_S, memory_bytes: int = DEFAULT_MEMORY_BYTES,
                 max_answer_chars: int = DEFAULT_MAX_ANSWER_CHARS, startup_timeout_s: float = 120.0) -> None:
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.timeout_s = timeout_s
        self.memory_bytes = memory_bytes
        self.max_answer_chars = max_answer_chars
        self.startup_timeout_s = startup_timeout_s
        # math-verify's alarms take whole seconds; two of them (parse, verify) fit inside timeout_s.
        self._inner_timeout = max(1, math.floor(timeout_s / 2))
        self.stats = VerifierStats()
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None
        self._owner_pid = -1
        self._buf = b""
        atexit.register(self.close)

    # -- public

    def score(self, response: str, ground_truth: str) -> float:
        """1.0 if the last box of ``response`` equals ``ground_truth`` symbolically, else 0.0."""
        return self.score_batch([(response, ground_truth)])[0]

    def score_batch(self, pairs: Sequence[tuple[str, str]]) -> list[float]:
        """Scores of ``(response, ground_truth)`` pairs, in order; each bounded by ``timeout_s``."""
        with self._lock:
            return [self._score_one(str(r), str(g)) for r, g in pairs]

    def close(self) -> None:
        """Stops the worker (a later call starts a new one)."""
        proc, self._proc = self._proc, None
        if proc is not None and self._owner_pid == os.getpid():
            _kill(proc)

    # -- internals

    def _score_one(self, response: str, ground_truth: str) -> float:
        self.stats.pairs += 1
        answer = extract_last_boxed(response, max_chars=self.max_answer_chars)
        if answer is None or not answer.strip():
            self.stats.no_box += 1
            return 0.0
        if answer.strip() == ground_truth.strip():
            self.stats.exact += 1
            return 1.0
        self._ensure_worker()
        reply = self._request({"a": answer, "g": ground_truth}, timeout_s=self.timeout_s)
        if reply is None:
            self.stats.timeouts += 1
            self.close()
            return 0.0
        if "error" in reply:
            self.stats.errors += 1
        if reply.get("exit"):
            self.close()
        return 1.0 if reply.get("ok") else 0.0

    def _ensure_worker(self) -> None:
        if self._proc is not None and self._owner_pid == os.getpid() and self._proc.poll() is None:
            return
        if self._owner_pid != -1:
            self.stats.restarts += 1
        self._proc = None  # a forked child never touches its parent's worker
        self._start_worker()

    def _start_worker(self) -> None:
        code = ("import sys, runpy; m = runpy.run_path(sys.argv[1]); "
                "m['_worker_main'](int(sys.argv[2]), int(sys.argv[3]))")
        cmd = [sys.executable, "-c", code, os.path.abspath(__file__), str(self.memory_bytes),
               str(self._inner_timeout)]
        self._proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      stderr=subprocess.DEVNULL, cwd=os.path.dirname(os.path.abspath(__file__)))
        self._owner_pid = os.getpid()
        self._buf = b""
        hello = self._read_reply(timeout_s=self.startup_timeout_s)
        if not hello or not hello.get("ready"):
            why = (hello or {}).get("error", f"no reply within {self.startup_timeout_s:.0f} s")
            self.close()
            raise RuntimeError(f"math-verify worker failed to start ({why}); "
                               f"check that `{sys.executable} -c 'import math_verify'` works")

    def _request(self, payload: dict, *, timeout_s: float) -> dict | None:
        assert self._proc is not None and self._proc.stdin is not None
        try:
            self._proc.stdin.write((json.dumps(payload) + "\n").encode())
            self._proc.stdin.flush()
        except (BrokenPipeError, OSError):
            return None
        return self._read_reply(timeout_s=timeout_s)

    def _read_reply(self, *, timeout_s: float) -> dict | None:
        """One reply line within ``timeout_s``; None on time-out or a dead worker."""
        assert self._proc is not None and self._proc.stdout is not None
        fd = self._proc.stdout.fileno()
        deadline = time.monotonic() + timeout_s
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            ready, _, _ = select.select([fd], [], [], left)
            if not ready:
                return None
            chunk = os.read(fd, 65536)
            if not chunk:
                return None  # worker died (e.g. killed by the OOM killer)
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        try:
            return json.loads(line)
        except ValueError:
            return None


def _kill(proc: subprocess.Popen) -> None:
    try:
        proc.kill()
        proc.wait(timeout=5)
    except Exception:  # noqa: BLE001 - already gone
        pass
    for stream in (proc.stdin, proc.stdout):
        try:
            if stream is not None:
                stream.close()
        except Exception:  # noqa: BLE001
            pass


# ----------------------------------------------------------------------------- module-level API

_VERIFIERS: dict[tuple[float, int, int], MathVerifier] = {}
_VERIFIERS_LOCK = threading.Lock()


def get_verifier(*, timeout_s: float = DEFAULT_TIMEOUT_S, memory_bytes: int = DEFAULT_MEMORY_BYTES,
                 max_answer_chars: int = DEFAULT_MAX_ANSWER_CHARS) -> MathVerifier:
    """The process's shared verifier for these bounds (one worker per distinct setting)."""
    key = (float(timeout_s), int(memory_bytes), int(max_answer_chars))
    with _VERIFIERS_LOCK:
        if key not in _VERIFIERS:
            _VERIFIERS[key] = MathVerifier(timeout_s=timeout_s, memory_bytes=memory_bytes,
                                           max_answer_chars=max_answer_chars)
        return _VERIFIERS[key]


def math_reward(response: str, ground_truth: str) -> float:
    """1.0 if the last ``\\boxed{}`` of ``response`` is equivalent to ``ground_truth``, else 0.0."""
    return get_verifier().score(response, ground_truth)


def batch_math_reward(pairs: Sequence[tuple[str, str]], *, timeout_s: float = DEFAULT_TIMEOUT_S,
                      memory_bytes: int = DEFAULT_MEMORY_BYTES,
                      max_answer_chars: int = DEFAULT_MAX_ANSWER_CHARS) -> list[float]:
    """``math_reward`` for many ``(response, ground_truth)`` pairs through one worker, in order."""
    verifier = get_verifier(timeout_s=timeout_s, memory_bytes=memory_bytes, max_answer_chars=max_answer_chars)
    return verifier.score_batch(pairs)
