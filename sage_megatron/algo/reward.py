"""Math reward: a response's final answer vs the ground truth, by math-verify (sympy).

    math_reward(response, ground_truth) -> 1.0 | 0.0
    batch_math_reward([(response, ground_truth), ...], extractor="boxed") -> [1.0 | 0.0, ...]

The final answer is the last ``\\boxed{...}`` by default; ``extractor`` picks another format
(ANSWER_EXTRACTORS: "The answer is N", GSM8K's "#### N", the last number written).

Bounds (no model output can hang or exhaust the trainer):

* extraction runs here, in linear time, and gives up on an answer longer than ``max_answer_chars``
  (default 1,000: final answers are short; a megabyte string or 10k nested braces scores 0.0
  without ever reaching sympy);
* verification runs in ``workers`` persistent worker subprocesses (clean interpreters that import only
  math-verify), one pair in flight per worker, under a wall-clock limit ``timeout_s`` per pair (default
  5 s) and an address-space cap ``memory_bytes`` (RLIMIT_AS, default 1 GiB). A pair that runs past the
  limit scores 0.0, its worker is killed and restarted (about 1 s); a MemoryError scores 0.0 and the
  worker restarts itself. ``batch_timeout_s`` bounds a whole batch: pairs not verified by then score
  0.0, so N adversarial answers cost at most that, not N x ``timeout_s``;
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


_ANSWER_IS = re.compile(r"answer\s+is\s*:?\s*", re.IGNORECASE)
_GSM8K = re.compile(r"####[ \t]*([^\n]*)")
_NUMBER = re.compile(r"[-+]?\d[\d,]*(?:\.\d+)?")


def _last_match(pattern: re.Pattern, text: str) -> re.Match | None:
    last = None
    for last in pattern.finditer(text):
        pass
    return last


def extract_answer_is(text: str, *, max_chars: int = DEFAULT_MAX_ANSWER_CHARS) -> str | None:
    """What follows the last "answer is" ("The answer is 42.", "the final answer is: $7$"): a box there if
    any, else the rest of that sentence without "$", "**" and a closing period. None if absent or too long."""
    last = _last_match(_ANSWER_IS, text)
    if last is None:
        return None
    tail = text[last.end():last.end() + max_chars + 2]
    if tail.lstrip("$ ").startswith(_BOX_COMMANDS):
        return extract_last_boxed(tail, max_chars=max_chars)
    sentence = re.split(r"\n|\.(?:\s|$)", tail, maxsplit=1)[0]
    answer = sentence.replace("**", "").replace("$", "").strip().rstrip(".").strip()
    return answer if answer and len(answer) <= max_chars else None


def extract_gsm8k(text: str, *, max_chars: int = DEFAULT_MAX_ANSWER_CHARS) -> str | None:
    """The answer after the last "#### " (GSM8K's format), commas dropped ("#### 1,200" -> "1200")."""
    last = _last_match(_GSM8K, text)
    if last is None:
        return None
    answer = last.group(1).replace(",", "").replace("$", "").strip().rstrip(".")
    return answer if answer and len(answer) <= max_chars else None


def extract_last_number(text: str, *, max_chars: int = DEFAULT_MAX_ANSWER_CHARS) -> str | None:
    """The last number written in ``text`` ("... so 12 + 7 = 19 apples." -> "19"), commas dropped."""
    last = _last_match(_NUMBER, text)
    if last is None:
        return None
    answer = last.group(0).replace(",", "").lstrip("+")
    return answer if len(answer) <= max_chars else None


# How a response's final answer is found, by name (config key ``reward.extractor``), as verl picks a scorer
# per dataset. All are linear in the response and give up on answers longer than ``max_chars``.
ANSWER_EXTRACTORS = {
    "boxed": extract_last_boxed,
    "answer_is": extract_answer_is,
    "gsm8k": extract_gsm8k,
    "last_number": extract_last_number,
}


def answer_extractor(name: str):
    """The extraction function called ``name``; a ValueError naming the valid ones otherwise."""
    try:
        return ANSWER_EXTRACTORS[name]
    except KeyError:
        raise ValueError(f"unknown answer extractor {name!r}; valid: {sorted(ANSWER_EXTRACTORS)}") from None


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
    no_answer: int = 0       # no (closed, short enough) answer found: 0.0 without a worker
    exact: int = 0           # answer string == ground truth: 1.0 without a worker
    timeouts: int = 0        # pairs killed at timeout_s
    errors: int = 0          # exceptions inside math-verify (scored 0.0)
    restarts: int = 0        # worker (re)starts after each worker's first
    past_deadline: int = 0   # pairs not verified before the batch's deadline (scored 0.0)


class _Worker:
    """One verification subprocess and its half-read reply line."""

    def __init__(self, memory_bytes: int, inner_timeout: int) -> None:
        code = ("import sys, runpy; m = runpy.run_path(sys.argv[1]); "
                "m['_worker_main'](int(sys.argv[2]), int(sys.argv[3]))")
        cmd = [sys.executable, "-c", code, os.path.abspath(__file__), str(memory_bytes), str(inner_timeout)]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     cwd=os.path.dirname(os.path.abspath(__file__)))
        self.owner_pid = os.getpid()
        self.ready = False
        self.buf = b""

    def alive(self) -> bool:
        return self.owner_pid == os.getpid() and self.proc.poll() is None

    def fileno(self) -> int:
        assert self.proc.stdout is not None
        return self.proc.stdout.fileno()

    def send(self, payload: dict) -> bool:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write((json.dumps(payload) + "\n").encode())
            self.proc.stdin.flush()
            return True
        except (BrokenPipeError, OSError):
            return False

    def read_line(self) -> dict | None | bool:
        """After select() said readable: the next reply, False when the line is still incomplete, None when
        the worker died or wrote garbage."""
        if b"\n" not in self.buf:
            chunk = os.read(self.fileno(), 65536)
            if not chunk:
                return None   # worker died (e.g. killed by the OOM killer)
            self.buf += chunk
            if b"\n" not in self.buf:
                return False
        line, self.buf = self.buf.split(b"\n", 1)
        try:
            return json.loads(line)
        except ValueError:
            return None

    def kill(self) -> None:
        if self.owner_pid == os.getpid():
            _kill(self.proc)


class MathVerifier:
    """Persistent, bounded math-verify workers. Thread-safe (one batch at a time).

    A batch's pairs are spread over ``workers`` subprocesses, one pair in flight per worker; each pair is
    bounded by ``timeout_s`` (its worker is killed and restarted) and the whole batch by
    ``batch_timeout_s`` (pairs not verified by then score 0.0), so N adversarial answers cost about
    N / workers x timeout_s, and never more than the batch deadline."""

    def __init__(self, *, timeout_s: float = DEFAULT_TIMEOUT_S, memory_bytes: int = DEFAULT_MEMORY_BYTES,
                 max_answer_chars: int = DEFAULT_MAX_ANSWER_CHARS, startup_timeout_s: float = 120.0,
                 extractor: str = "boxed", workers: int = 1, batch_timeout_s: float | None = None) -> None:
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        if batch_timeout_s is not None and batch_timeout_s <= 0:
            raise ValueError(f"batch_timeout_s must be > 0 or None, got {batch_timeout_s}")
        self.extract = answer_extractor(extractor)
        self.timeout_s = timeout_s
        self.memory_bytes = memory_bytes
        self.max_answer_chars = max_answer_chars
        self.startup_timeout_s = startup_timeout_s
        self.num_workers = workers
        self.batch_timeout_s = batch_timeout_s
        # math-verify's alarms take whole seconds; two of them (parse, verify) fit inside timeout_s.
        self._inner_timeout = max(1, math.floor(timeout_s / 2))
        self.stats = VerifierStats()
        self._lock = threading.Lock()
        self._workers: list[_Worker | None] = [None] * workers
        self._started_once = [False] * workers
        atexit.register(self.close)

    # -- public

    def score(self, response: str, ground_truth: str) -> float:
        """1.0 if the extracted answer of ``response`` equals ``ground_truth`` symbolically, else 0.0."""
        return self.score_batch([(response, ground_truth)])[0]

    def score_batch(self, pairs: Sequence[tuple[str, str]]) -> list[float]:
        """Scores of ``(response, ground_truth)`` pairs, in order; each bounded by ``timeout_s``, all of them
        by ``batch_timeout_s``."""
        with self._lock:
            scores = [0.0] * len(pairs)
            todo: list[tuple[int, str, str]] = []
            for i, (response, truth) in enumerate(pairs):
                self.stats.pairs += 1
                answer = self.extract(str(response), max_chars=self.max_answer_chars)
                if answer is None or not answer.strip():
                    self.stats.no_answer += 1
                elif answer.strip() == str(truth).strip():
                    self.stats.exact += 1
                    scores[i] = 1.0
                else:
                    todo.append((i, answer, str(truth)))
            if todo:
                self._verify(todo, scores)
            return scores

    @property
    def _proc(self) -> subprocess.Popen | None:
        """The first worker's process (tests read its limits)."""
        w = self._workers[0]
        return w.proc if w is not None else None

    def close(self) -> None:
        """Stops the workers (a later call starts new ones)."""
        for slot, w in enumerate(self._workers):
            self._workers[slot] = None
            if w is not None:
                w.kill()

    # -- internals

    def _verify(self, todo: list[tuple[int, str, str]], scores: list[float]) -> None:
        """Send each pair to a free worker, collect replies as they come, enforce both deadlines."""
        queue = list(reversed(todo))
        slots = self._ready_slots(min(len(todo), self.num_workers))
        # From here: the start-up of workers a previous batch killed is bounded by startup_timeout_s, not
        # charged to this batch (on a slow CPU it took more than a 1 s deadline, scoring a right answer 0.0).
        batch_deadline = time.monotonic() + self.batch_timeout_s if self.batch_timeout_s else math.inf
        in_flight: dict[int, tuple[int, float]] = {}   # slot -> (pair index, pair deadline)
        while queue or in_flight:
            for slot in slots:
                if queue and slot not in in_flight:
                    i, answer, truth = queue.pop()
                    if self._ensure_worker(slot).send({"a": answer, "g": truth}):
                        in_flight[slot] = (i, time.monotonic() + self.timeout_s)
                    else:
                        self.stats.errors += 1   # the worker died between batches: the pair scores 0.0
                        self._drop(slot)
            if not in_flight:
                continue
            now = time.monotonic()
            wait = min(min(d for _, d in in_flight.values()), batch_deadline) - now
            readable = select.select([self._workers[s] for s in in_flight], [], [], max(0.0, wait))[0] if wait > 0 else []
            for w in readable:
                slot = self._workers.index(w)
                reply = w.read_line()
                if reply is False:
                    continue
                i, _ = in_flight.pop(slot)
                if reply is None:
                    self.stats.errors += 1
                    self._drop(slot)
                    continue
                if "error" in reply:
                    self.stats.errors += 1
                if reply.get("exit"):
                    self._drop(slot)
                scores[i] = 1.0 if reply.get("ok") else 0.0
            now = time.monotonic()
            for slot, (i, deadline) in list(in_flight.items()):
                if now >= deadline:
                    self.stats.timeouts += 1
                    del in_flight[slot]
                    self._drop(slot)
            if now >= batch_deadline:
                self.stats.past_deadline += len(queue) + len(in_flight)
                for slot in in_flight:
                    self._drop(slot)
                return

    def _ready_slots(self, n: int) -> list[int]:
        """The first ``n`` worker slots, started together and each answered its hello."""
        for slot in range(n):
            w = self._workers[slot]
            if w is None or not w.alive():
                if self._started_once[slot]:
                    self.stats.restarts += 1
                self._started_once[slot] = True
                self._workers[slot] = _Worker(self.memory_bytes, self._inner_timeout)
        for slot in range(n):
            w = self._workers[slot]
            assert w is not None
            if not w.ready:
                self._await_hello(w)
        return list(range(n))

    def _ensure_worker(self, slot: int) -> _Worker:
        w = self._workers[slot]
        if w is None or not w.alive():
            self._ready_slots(slot + 1)
            w = self._workers[slot]
        assert w is not None
        return w

    def _await_hello(self, w: _Worker) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        hello: dict | None | bool = False
        while hello is False:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([w], [], [], left)[0]:
                hello = None
                break
            hello = w.read_line()
        if not hello or not hello.get("ready"):
            why = (hello or {}).get("error", f"no reply within {self.startup_timeout_s:.0f} s")
            self.close()
            raise RuntimeError(f"math-verify worker failed to start ({why}); "
                               f"check that `{sys.executable} -c 'import math_verify'` works")
        w.ready = True

    def _drop(self, slot: int) -> None:
        w, self._workers[slot] = self._workers[slot], None
        if w is not None:
            w.kill()


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

_VERIFIERS: dict[tuple, MathVerifier] = {}
_VERIFIERS_LOCK = threading.Lock()


def get_verifier(*, timeout_s: float = DEFAULT_TIMEOUT_S, memory_bytes: int = DEFAULT_MEMORY_BYTES,
                 max_answer_chars: int = DEFAULT_MAX_ANSWER_CHARS, extractor: str = "boxed", workers: int = 1,
                 batch_timeout_s: float | None = None) -> MathVerifier:
    """The process's shared verifier for these settings (one set of workers per distinct setting)."""
    key = (float(timeout_s), int(memory_bytes), int(max_answer_chars), extractor, int(workers), batch_timeout_s)
    with _VERIFIERS_LOCK:
        if key not in _VERIFIERS:
            _VERIFIERS[key] = MathVerifier(timeout_s=timeout_s, memory_bytes=memory_bytes,
                                           max_answer_chars=max_answer_chars, extractor=extractor,
                                           workers=workers, batch_timeout_s=batch_timeout_s)
        return _VERIFIERS[key]


def math_reward(response: str, ground_truth: str) -> float:
    """1.0 if the last ``\\boxed{}`` of ``response`` is equivalent to ``ground_truth``, else 0.0."""
    return get_verifier().score(response, ground_truth)


def batch_math_reward(pairs: Sequence[tuple[str, str]], *, timeout_s: float = DEFAULT_TIMEOUT_S,
                      memory_bytes: int = DEFAULT_MEMORY_BYTES, max_answer_chars: int = DEFAULT_MAX_ANSWER_CHARS,
                      extractor: str = "boxed", workers: int = 1,
                      batch_timeout_s: float | None = None) -> list[float]:
    """``math_reward`` for many ``(response, ground_truth)`` pairs, in order: the answer found by
    ``extractor`` (a name in ANSWER_EXTRACTORS), verified by ``workers`` processes within ``batch_timeout_s``."""
    verifier = get_verifier(timeout_s=timeout_s, memory_bytes=memory_bytes, max_answer_chars=max_answer_chars,
                            extractor=extractor, workers=workers, batch_timeout_s=batch_timeout_s)
    return verifier.score_batch(pairs)
