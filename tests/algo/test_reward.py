"""Math reward: boxed extraction, math-verify equivalence, and the time/memory bounds on adversarial inputs."""
from __future__ import annotations

import threading
import time

import pytest

from sage_megatron.algo.reward import (MathVerifier, answer_extractor, batch_math_reward, extract_last_boxed,
                                        math_reward)

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


# ----------------------------------------------------------------------------- extractors


@pytest.mark.parametrize("extractor, text, expected", [
    ("answer_is", "12 + 7 = 19. The answer is 19.", "19"),
    ("answer_is", "So the final answer is: $7$", "7"),
    ("answer_is", "THE ANSWER IS 3.5.\nThanks", "3.5"),
    ("answer_is", "The answer is \\boxed{\\frac{1}{2}}.", "\\frac{1}{2}"),
    ("answer_is", "the answer is 4. Wait, the answer is **5**.", "5"),           # the last one counts
    ("answer_is", "I think it is 5", None),
    ("gsm8k", "She has 1,200 - 200 = 1,000.\n#### 1,000", "1000"),
    ("gsm8k", "#### 3\nmore text\n#### 4", "4"),
    ("gsm8k", "The answer is 4", None),
    ("last_number", "Mia starts with 12. 12 + 7 = 19 apples.", "19"),
    ("last_number", "It drops to -3,500.25 degrees", "-3500.25"),
    ("last_number", "no digits here", None),
    ("boxed", "The answer is 19.", None),
])
def test_answer_extractors(extractor, text, expected):
    assert answer_extractor(extractor)(text) == expected


def test_unknown_extractor_names_the_valid_ones():
    with pytest.raises(ValueError, match="answer_is.*boxed.*gsm8k.*last_number"):
        answer_extractor("final")


@pytest.mark.parametrize("extractor", ["answer_is", "gsm8k", "last_number"])
def test_extractors_are_linear_on_a_megabyte(extractor):
    text = ("answer is 1 #### 2 " * 60_000)[:1_000_000] + "x" * 1_000_000
    t0 = time.monotonic()
    answer_extractor(extractor)(text)
    assert time.monotonic() - t0 < BOUND_S


@pytest.mark.parametrize("extractor, response, truth, expected", [
    ("answer_is", "The answer is 19 apples.", "19", 1.0),       # math-verify reads the number
    ("answer_is", "The answer is 0.5.", "1/2", 1.0),
    ("answer_is", "The answer is 20.", "19", 0.0),
    ("gsm8k", "#### 1,000", "1000", 1.0),
    ("last_number", "so she has 6/2 = 3", "3", 1.0),
    ("last_number", "so she has 3 apples, not 4", "3", 0.0),
])
def test_extractors_feed_math_verify(extractor, response, truth, expected):
    assert batch_math_reward([(response, truth)], extractor=extractor) == [expected]


# ----------------------------------------------------------------------------- parallel workers


def test_pairs_spread_over_workers_keep_their_order():
    v = MathVerifier(workers=2)
    try:
        pairs = [("\\boxed{6/2}", "3"), ("\\boxed{2}", "3"), ("\\boxed{0.5}", "1/2"), ("\\boxed{1/3}", "0.5"),
                 ("none", "3"), ("\\boxed{3}", "3")]
        assert v.score_batch(pairs) == [1.0, 0.0, 1.0, 0.0, 0.0, 1.0]
        pids = {w.proc.pid for w in v._workers if w is not None}
        assert len(pids) == 2                       # both workers took pairs
        assert v.stats.no_answer == 1 and v.stats.exact == 1
    finally:
        v.close()


def test_batch_deadline_bounds_many_adversarial_answers():
    # 6 power towers, each far past the 1 s deadline: scored 0.0 at the batch deadline, not 6 x 30 s.
    v = MathVerifier(timeout_s=30.0, workers=2, batch_timeout_s=1.0)
    try:
        t0 = time.monotonic()
        assert v.score_batch([("\\boxed{9^{9^{9^9}}}", "1")] * 6) == [0.0] * 6
        assert time.monotonic() - t0 < BOUND_S
        assert v.stats.past_deadline == 6
        assert v.score_batch([("\\boxed{3/6}", "0.5")]) == [1.0]    # killed workers are restarted
    finally:
        v.close()
