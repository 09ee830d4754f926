"""Hint JSON from a model's output: {"level_1": ..., "level_L": ...} in a fenced block or a bare object."""
from __future__ import annotations

import json
import re
from typing import Any, Iterator

_FENCE = re.compile(r"```[ \t]*(?:json|JSON)?[ \t]*\n?(.*?)```", re.S)
_LEVEL1_OPEN = re.compile(r'\{\s*"level_1"')
_VALID_ESCAPE = re.compile(r'\\(\\|"|/|u[0-9a-fA-F]{4}|[bfnrt](?![a-z]))?')
_MAX_PARSE_CHARS = 200_000
_MAX_CANDIDATES = 64


def parse_hint_json(text: str, *, levels: int = 3) -> dict[int, str] | None:
    """Hints ``{1: ..., L: ...}`` from a model's output, or None when unusable.

    Candidates, in order: fenced ```json blocks; objects starting ``{"level_1"``; then each
    top-level balanced ``{...}``. The first candidate that is a JSON object with non-empty string
    values for every key level_1..level_L wins (extra keys ignored, values stripped). LaTeX written
    with single backslashes ("\\frac", "\\theta": invalid or silently wrong JSON escapes) is repaired
    (see _loads_lenient). Only the last 200k characters are read (hints come at the end, after
    any reasoning).
    """
    text = text[-_MAX_PARSE_CHARS:]
    for candidate in _hint_candidates(text):
        hints = _validated_hints(_loads_lenient(candidate), levels)
        if hints is not None:
            return hints
    return None


def _hint_candidates(text: str) -> Iterator[str]:
    count = 0
    for m in _FENCE.finditer(text):
        yield m.group(1).strip()
        count += 1
    for m in _LEVEL1_OPEN.finditer(text):
        end = _balanced_end(text, m.start(), json_strings=True)
        if end is not None:
            yield text[m.start():end]
        count += 1
        if count >= _MAX_CANDIDATES:
            return
    depth, start = 0, -1
    for i, ch in enumerate(text):  # top-level {...} spans, one linear pass
        if ch == "{":
            if depth == 0:
                start = i
            depth += 1
        elif ch == "}" and depth > 0:
            depth -= 1
            if depth == 0:
                yield text[start:i + 1]
                count += 1
                if count >= _MAX_CANDIDATES:
                    return


def _balanced_end(text: str, start: int, *, json_strings: bool) -> int | None:
    """Index after the ``}`` matching ``text[start] == "{"``; JSON strings are skipped if asked."""
    depth, in_str, i = 0, False, start
    while i < len(text):
        ch = text[i]
        if in_str:
            if ch == "\\":
                i += 1
            elif ch == '"':
                in_str = False
        elif ch == '"' and json_strings:
            in_str = True
        elif ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    return None


def _loads_lenient(candidate: str) -> Any:
    r"""json.loads of the LaTeX-repaired text when the repair changed anything, else plain json.loads.

    Repair: every backslash that does not start ``\\``, ``\"``, ``\/``, ``\uXXXX`` or a one-letter
    escape ``\b \f \n \r \t`` NOT followed by a lowercase letter is doubled, so "\frac", "\theta",
    "\nu", "\sqrt" survive as LaTeX while "\n" and "\nThe" stay newlines.
    """
    repaired = _VALID_ESCAPE.sub(lambda m: m.group(0) if m.group(1) else "\\\\", candidate)
    for text in ((repaired, candidate) if repaired != candidate else (candidate,)):
        try:
            return json.loads(text)
        except (ValueError, RecursionError):
            continue
    return None


def _validated_hints(obj: Any, levels: int) -> dict[int, str] | None:
    if not isinstance(obj, dict):
        return None
    hints = {}
    for level in range(1, levels + 1):
        value = obj.get(f"level_{level}")
        if not isinstance(value, str) or not value.strip():
            return None
        hints[level] = value.strip()
    return hints
