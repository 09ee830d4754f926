"""Prompt templates: the five texts of a template set, filled and rendered through the policy's chat template.

A set is a folder of ``answer_system.txt``, ``answer_user.txt`` ({problem}), ``answer_user_hinted.txt``
({problem}, {hint}), ``hint_system.txt`` and ``hint_user.txt`` ({problem}, {solution}); the paper's
text is ``templates/paper/``, the toy task's ``sage_megatron/tasks/templates/toy/``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

Message = dict[str, str]
Encode = Callable[[list[Message]], tuple[int, ...]]          # chat messages -> prompt token ids


PAPER_TEMPLATES = Path(__file__).resolve().parent / "templates" / "paper"
TEMPLATE_PLACEHOLDERS: dict[str, tuple[str, ...]] = {
    "answer_system": (),
    "answer_user": ("problem",),
    "answer_user_hinted": ("problem", "hint"),
    "hint_system": (),
    "hint_user": ("problem", "solution"),
}


@dataclass(frozen=True)
class Templates:
    """The five prompt texts of a template set (see templates/paper/)."""

    answer_system: str        # "reason step by step ... \boxed{}"
    answer_user: str          # {problem}
    answer_user_hinted: str   # {problem} + a line introducing the hint + {hint}
    hint_system: str          # tutor role, three levels, never the final answer, JSON format
    hint_user: str            # "Question: {problem}\n\nSolution: {solution}"


def load_templates(directory: str | Path = PAPER_TEMPLATES) -> Templates:
    """Reads ``<name>.txt`` for each template (one trailing newline dropped) and checks placeholders."""
    d = Path(directory)
    texts = {}
    for name, needed in TEMPLATE_PLACEHOLDERS.items():
        path = d / f"{name}.txt"
        if not path.is_file():
            raise FileNotFoundError(f"template set {d} has no {name}.txt (a set needs "
                                    f"{', '.join(n + '.txt' for n in TEMPLATE_PLACEHOLDERS)})")
        text = path.read_text(encoding="utf-8")
        text = text[:-1] if text.endswith("\n") else text
        for placeholder in needed:
            if "{" + placeholder + "}" not in text:
                raise ValueError(f"template {path} lacks the placeholder {{{placeholder}}} "
                                 f"(it needs {', '.join('{' + p + '}' for p in needed)})")
        texts[name] = text
    return Templates(**texts)


def fill(template: str, **values: str) -> str:
    """``template`` with ``{name}`` replaced for each given name, in one pass.

    Values are never re-scanned (a problem containing "{hint}" stays as it is) and other braces
    (LaTeX, JSON examples) are left alone.
    """
    if not values:
        return template
    pattern = re.compile(r"\{(" + "|".join(re.escape(k) for k in values) + r")\}")
    return pattern.sub(lambda m: values[m.group(1)], template)


def answer_messages(templates: Templates, *, problem: str, hint: str | None = None) -> list[Message]:
    """[system, user] of the answer prompt; hinted when ``hint`` is given."""
    if hint is None:
        user = fill(templates.answer_user, problem=problem)
    else:
        user = fill(templates.answer_user_hinted, problem=problem, hint=hint)
    return [{"role": "system", "content": templates.answer_system}, {"role": "user", "content": user}]


def hint_messages(templates: Templates, *, problem: str, solution: str) -> list[Message]:
    """[system, user] of the hint-writing prompt (question and reference solution)."""
    user = fill(templates.hint_user, problem=problem, solution=solution)
    return [{"role": "system", "content": templates.hint_system}, {"role": "user", "content": user}]


def chat_encoder(tokenizer: Any, **chat_template_kwargs: Any) -> Encode:
    """An ``Encode`` through a Hugging Face tokenizer's own chat template (generation prompt added).

    The template renders text (``tokenize=False``, so the transformers 4/5 return types do not
    matter), then the text is tokenized without adding special tokens a second time.
    ``chat_template_kwargs`` go to the template (e.g. ``enable_thinking=False`` for Qwen3).
    """
    def encode(messages: list[Message]) -> tuple[int, ...]:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                             **chat_template_kwargs)
        return tuple(tokenizer(text, add_special_tokens=False)["input_ids"])

    return encode
