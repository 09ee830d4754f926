"""Math reward: boxed extraction, math-verify equivalence, and the time/memory bounds on adversarial inputs."""
from __future__ import annotations

import threading
import time

import pytest

from sage_megatron.algo.reward import MathVerifier, batch_math_reward, extract_last_boxed, math_reward

BOUND_S = 15.0  # generous wall-clock bound per adversarial call on a loaded 2-core machine


# ----------------------------------------------------------------------------- extraction


@pytest.mark.parametrize("text, expected", [
    ("first \\boxed{1} then \\boxed{\\frac{1}{2}} done", "\\frac{1}{2}"),   # the LAST box
    ("\\boxed{\\{1,2\\}}", "\\{1,2\\}"),                                    # escaped braces do not count
    ("\\boxed{a{b}c}", "a{b}c"),                                            # nested braces matched
    ("\\boxed {7}", "7"),                                                   # space before the brace
    ("so $\\boxed 7$.", "7"),                                               # "\boxed " without braces
    ("\\fbox{9}", "9"),
    ("\\boxed{1", None),                                                    # never closed
    ("no box here", None),
])
def test_extract_last_boxed(text, expected):
    assert extract_last_boxed(text) == expected


def test_extract_gives_up_on_long_answers():
    # 11 chars of content with max_chars=10 -> None; 10 chars -> returned
    assert extract_last_boxed("\\boxed{" + "1" * 11 + "}", max_chars=10) is None
    assert extract_last_boxed("\\boxed{" + "1" * 10 + "}", max_chars=10) == "1" * 10


# ----------------------------------------------------------------------------- verdicts


@pytest.mark.parametrize("response, truth, expected", [
    ("The answer is \\boxed{\\frac{1}{2}}.", "0.5", 1.0),     # 1/2 == 0.5
    ("\\boxed{(x+1)^2}", "x^2+2x+1", 1.0),                    # symbolic expansion
    ("\\boxed{2\\sqrt{2}}", "\\sqrt{8}", 1.0),                # sqrt(8) = 2 sqrt(2)
    ("\\boxed{4}", "5", 0.0),
    ("I think 5", "5", 0.0),                                   # no box -> 0
    ("\\boxed{1} wait, no: \\boxed{5}", "5", 1.0),             # the last box counts
    ("\\boxed{5} wait, no: \\boxed{1}", "5", 0.0),
])
def test_math_reward_verdicts(response, truth, expected):
    assert math_reward(response, truth) == expected


def test_batch_keeps_order():
    pairs = [("\\boxed{3}", "3"), ("\\boxed{2}", "3"), ("\\boxed{6/2}", "3"), ("none", "3")]
    assert batch_math_reward(pairs) == [1.0, 0.0, 1.0, 0.0]


def test_works_from_a_non_main_thread():
    # math-verify's own signal.alarm timeouts raise outside the main thread; our worker avoids that.
    out = []
    t = threading.Thread(target=lambda: out.append(math_reward("\\boxed{\\frac{2}{4}}", "1/2")))
    t.start()
    t.join(60)
    assert out == [1.0]


# ----------------------------------------------------------------------------- adversarial inputs


@pytest.mark.parametrize("name, response", [
    ("power tower", "\\boxed{9^{9^{9^9}}}"),
    ("megabyte, no box", "x" * 1_000_000),
    ("megabyte before a wrong box", "y" * 1_000_000 + "\\boxed{7}"),
    ("10k nested braces", "\\boxed{" + "{" * 10_000 + "1" + "}" * 10_000 + "}"),
    ("10k unclosed braces", "\\boxed{" + "{" * 10_000),
    ("400 nested braces (under the length cap)", "\\boxed{" + "{" * 400 + "1" + "}" * 400 + "}"),
    ("factorial tower", "\\boxed{100000!!!}"),
])
def test_adversarial_inputs_are_bounded(name, response):
    t0 = time.monotonic()
    assert math_reward(response, "5") == 0.0, name
    assert time.monotonic() - t0 < BOUND_S, name


def test_hard_timeout_kills_and_restarts_worker():
    # timeout_s=0.5 is shorter than math-verify's own 1 s alarm, so the parent's kill is what stops it.
    v = MathVerifier(timeout_s=0.5)
    try:
        t0 = time.monotonic()
        assert v.score("\\boxed{9^{9^{9^9}}}", "1") == 0.0
        assert time.monotonic() - t0 < BOUND_S
        assert v.stats.timeouts == 1
        assert v.score("\\boxed{\\frac{3}{6}}", "0.5") == 1.0   # a fresh worker answers
        assert v.stats.restarts == 1
    finally:
        v.close()


def test_worker_runs_under_the_memory_cap():
    cap = 768 << 20  # 768 MiB = 805306368 bytes
    v = MathVerifier(memory_bytes=cap)
    try:
        assert v.score("\\boxed{1/4}", "0.25") == 1.0
        limits = open(f"/proc/{v._proc.pid}/limits").read()
        line = next(l for l in limits.splitlines() if l.startswith("Max address space"))
        assert line.split()[3:5] == ["805306368", "805306368"]
    finally:
        v.close()
