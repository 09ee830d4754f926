"""Pretrain the tiny policy of the embedded toy task (``toy_task.py``) from scratch, on CPU.

    python -m sage_megatron.tasks.toy_pretrain --out /tmp/toy_policy --eval     # ~2 min train + eval

A char-level HF ``LlamaForCausalLM`` (~0.8M parameters, fp32) is trained with a plain torch loop
(AdamW, warmup + cosine lr, right-padded batches, loss on assistant tokens only) on a mixture of
three kinds of chat examples, all rendered with the toy templates and the tokenizer's chat template:

  (a) answer prompt -> step-by-step solution + ``\\boxed{answer}``; mostly 1-4 steps, few long chains;
  (b) hint prompt (problem + reference solution) -> the JSON hints ``{"level_1": ...}``, so that
      SAGE's self-hinting is real: the policy writes its own hints from a solution;
  (c) hinted answer prompt (problem + a hint level) -> the full solution, continuing the hint.

The result is the starting policy of GRPO vs SAGE: accuracy at temperature 1 falls with the number
of steps (many hard prompts get G wrong samples: no GRPO signal), is much higher on hard items with
the level-3 hint, and the hint prompt yields parsable JSON. ``evaluate_policy`` measures exactly
that. ``cached_toy_policy`` keys the checkpoint by a hash of the recipe, code version and templates,
and writes it atomically, so repeated runs reuse it.

The default recipe's result is SHIPPED in ``sage_megatron/tasks/toy_policy/`` (1.3 MB, with the report of
``evaluate_policy`` on it): whether 1,200 steps of this tiny model learn the digit arithmetic or only the
format is decided by float rounding, and rounding differs between CPUs (the same recipe and seed
learned on one 2-core machine and stayed at chance on another), so a fresh machine copies the shipped
weights instead of gambling. ``ship_policy`` remakes the copy (command in its docstring); recipes other
than the default are trained here, and ``check_learned`` says so loudly when one stays at chance.
"""
from __future__ import annotations

import argparse
import dataclasses
import fcntl
import hashlib
import json
import math
import random
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from sage_megatron.algo.hint_json import parse_hint_json
from sage_megatron.algo.reward import integer_reward
from sage_megatron.algo.templates import Templates, answer_messages, hint_messages, load_templates
from sage_megatron.fsutil import atomic_output_dir
from sage_megatron.tasks import toy_task

# Bump when a change here or in toy_task.py changes the trained weights (invalidates caches).
CODE_VERSION = 2
IGNORE = -100


@dataclass(frozen=True)
class ToyPretrainRecipe:
    """Everything that determines the pretrained weights (hashed by ``cached_toy_policy``)."""

    seed: int = 1                   # model init and data stream seed. Measured (1,200 steps, bitwise the same
    #                                 with 1 or 2 threads): seed 0 learns the format but not the digit
    #                                 arithmetic (1-step accuracy 0.16, chance ~0.1); seed 1 learns it (0.62).
    steps: int = 1200               # optimizer steps (the time budget may stop earlier)
    batch_size: int = 48            # sequences per step, right-padded to the longest
    bucket: int = 16                # batches drawn at once and grouped by length (less padding)
    lr: float = 3e-3                # peak AdamW lr
    min_lr_ratio: float = 0.1       # cosine decays to lr * this
    warmup_steps: int = 40
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    hidden_size: int = 128          # head_dim = hidden/heads = 32: a head size vLLM's CPU backend takes
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    ffn_hidden_size: int = 256
    max_position_embeddings: int = 512
    mix: tuple[float, float, float] = (0.5, 0.2, 0.3)   # shares of (a) answer, (b) hint, (c) hinted answer
    slip_rate: float = 0.25         # (a), (c): chance that the teacher writes a step's result wrong
    answer_steps: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 7, 8)
    answer_step_weights: tuple[float, ...] = (1.0, 1.0, 1.0, 1.0, 0.4, 0.15, 0.05, 0.05)
    hint_steps: tuple[int, ...] = (2, 3, 4, 5, 6, 7, 8)         # (b), uniform
    hinted_steps: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 7, 8)    # (c), uniform
    hinted_level_weights: tuple[float, float, float] = (0.25, 0.25, 0.5)   # (c): level_1, level_2, level_3
    template_dir: str = ""          # "" = sage_megatron/tasks/templates/toy (its texts are hashed, not its path)

    def key(self) -> str:
        """Hash of the recipe, the code version and the template texts."""
        payload = dataclasses.asdict(self)
        payload.pop("template_dir")
        payload["templates"] = dataclasses.asdict(load_templates(self.template_dir or toy_task.TEMPLATE_DIR))
        payload["code_version"] = CODE_VERSION
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


DEFAULT_RECIPE = ToyPretrainRecipe()


# ----------------------------------------------------------------------------- data


class ExampleMaker:
    """Renders toy rows into (input_ids, labels) chat examples; labels are -100 on the prompt."""

    def __init__(self, tokenizer, templates: Templates):
        self.tok = tokenizer
        self.templates = templates
        self.eos = tokenizer.eos_token_id

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        text = self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return self.tok.encode(text, add_special_tokens=False)

    def answer_prompt(self, row: dict, hint: str | None = None) -> list[int]:
        return self.prompt_ids(answer_messages(self.templates, problem=row["problem"], hint=hint))

    def hint_prompt(self, row: dict) -> list[int]:
        return self.prompt_ids(hint_messages(self.templates, problem=row["problem"], solution=row["solution"]))

    def example(self, prompt: list[int], completion: str) -> tuple[list[int], list[int]]:
        comp = self.tok.encode(completion, add_special_tokens=False) + [self.eos]
        return prompt + comp, [IGNORE] * len(prompt) + comp

    def sample(self, rng: random.Random, recipe: ToyPretrainRecipe) -> tuple[list[int], list[int]]:
        """One example of the mixture: (a) answer, (b) hint JSON or (c) hinted answer."""
        kind = rng.choices((0, 1, 2), weights=recipe.mix)[0]
        if kind == 0:
            k = rng.choices(recipe.answer_steps, weights=recipe.answer_step_weights)[0]
            row = toy_task.sample_row(rng, k)
            return self.example(self.answer_prompt(row),
                                toy_task.sloppy_response(row, rng, slip_rate=recipe.slip_rate))
        if kind == 1:
            row = toy_task.sample_row(rng, rng.choice(recipe.hint_steps))
            return self.example(self.hint_prompt(row), toy_task.hint_json(row))
        row = toy_task.sample_row(rng, rng.choice(recipe.hinted_steps))
        hint = toy_task.hint_levels(row)[rng.choices(toy_task.HINT_KEYS, weights=recipe.hinted_level_weights)[0]]
        return self.example(self.answer_prompt(row, hint),
                            toy_task.sloppy_response(row, rng, slip_rate=recipe.slip_rate, hint=hint))


def collate(examples: Sequence[tuple[list[int], list[int]]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad to the longest: input_ids (B, T) and labels (B, T) with -100 on prompt and padding."""
    T = max(len(ids) for ids, _ in examples)
    ids = torch.full((len(examples), T), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), T), IGNORE, dtype=torch.long)
    for i, (x, y) in enumerate(examples):
        ids[i, : len(x)] = torch.tensor(x)
        labels[i, : len(y)] = torch.tensor(y)
    return ids, labels


def bucketed_batches(maker: "ExampleMaker", rng: random.Random, recipe: "ToyPretrainRecipe", pad_id: int):
    """Endless (input_ids, labels) batches; each draws ``bucket`` batches' worth of examples, sorts
    them by length and serves them in random order, so padding wastes little compute."""
    n = recipe.batch_size
    while True:
        pool = sorted((maker.sample(rng, recipe) for _ in range(n * recipe.bucket)), key=lambda e: len(e[0]))
        chunks = [pool[i: i + n] for i in range(0, len(pool), n)]
        rng.shuffle(chunks)
        for chunk in chunks:
            yield collate(chunk, pad_id)


def assistant_loss(model, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over assistant tokens. No attention mask: padding is on the right
    of a causal model, so it never influences a real position (and SDPA keeps its causal fast path)."""
    logits = model(input_ids=ids).logits[:, :-1]                       # (B, T-1, V)
    return torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.size(-1)).float(), labels[:, 1:].reshape(-1), ignore_index=IGNORE)


# ----------------------------------------------------------------------------- model


def build_model(recipe: ToyPretrainRecipe, tokenizer):
    """A fresh fp32 LlamaForCausalLM of the recipe's size (standard config: HF, vLLM, the bridge)."""
    from transformers import AutoModelForCausalLM

    from sage_megatron.testing.tiny_models import tiny_config

    config = tiny_config(
        "llama", vocab_size=len(tokenizer), hidden_size=recipe.hidden_size, num_layers=recipe.num_layers,
        num_heads=recipe.num_heads, num_kv_heads=recipe.num_kv_heads, ffn_hidden_size=recipe.ffn_hidden_size,
        max_position_embeddings=recipe.max_position_embeddings,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(recipe.seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa")


def _lr_factor(progress: float, step: int, recipe: ToyPretrainRecipe) -> float:
    if step < recipe.warmup_steps:
        return (step + 1) / recipe.warmup_steps
    p = min(1.0, progress)
    return recipe.min_lr_ratio + (1 - recipe.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * p))


class _Threads:
    """Scoped torch.set_num_threads."""

    def __init__(self, n: int | None):
        self.n = n

    def __enter__(self):
        self.old = torch.get_num_threads()
        if self.n:
            torch.set_num_threads(self.n)
        return torch.get_num_threads()

    def __exit__(self, *exc):
        torch.set_num_threads(self.old)


def train_toy_policy(
    *,
    recipe: ToyPretrainRecipe = DEFAULT_RECIPE,
    minutes_budget: float | None = None,
    num_threads: int | None = None,
    log: Callable[[str], None] | None = print,
    log_every: int = 100,
):
    """Train the toy policy from scratch in memory: returns (model, tokenizer, meta).

    ``minutes_budget`` additionally stops training when the wall time is spent (the lr schedule
    then follows elapsed time, so the result depends on the machine's speed: a cached policy uses
    ``recipe.steps`` only). ``meta`` holds the recipe, loss curve, wall time and thread count.
    """
    from sage_megatron.testing.tiny_models import build_char_tokenizer

    tok = build_char_tokenizer()
    maker = ExampleMaker(tok, load_templates(recipe.template_dir or toy_task.TEMPLATE_DIR))
    rng = random.Random(f"toy-pretrain/{recipe.seed}")
    budget_s = None if minutes_budget is None else 60.0 * minutes_budget

    with _Threads(num_threads) as threads:
        model = build_model(recipe, tok)
        model.train()
        decay = [p for p in model.parameters() if p.ndim >= 2]
        no_decay = [p for p in model.parameters() if p.ndim < 2]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": recipe.weight_decay},
                                 {"params": no_decay, "weight_decay": 0.0}],
                                lr=recipe.lr, betas=(0.9, 0.98), eps=1e-8)
        batches = bucketed_batches(maker, rng, recipe, tok.pad_token_id)
        losses: list[tuple[int, float]] = []
        ema, done = None, 0
        t0 = time.perf_counter()
        for step in range(recipe.steps):
            elapsed = time.perf_counter() - t0
            if budget_s is not None and elapsed >= budget_s:
                break
            progress = step / recipe.steps if budget_s is None else max(step / recipe.steps, elapsed / budget_s)
            for g in opt.param_groups:
                g["lr"] = recipe.lr * _lr_factor(progress, step, recipe)
            ids, labels = next(batches)                                   # (B, T) each
            loss = assistant_loss(model, ids, labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.grad_clip)
            opt.step()
            done = step + 1
            value = loss.item()
            ema = value if ema is None else 0.95 * ema + 0.05 * value
            if step % 10 == 0 or done == recipe.steps:
                losses.append((step, round(value, 5)))
            if log and (step % log_every == 0 or done == recipe.steps):
                log(f"[toy_pretrain] step {step:5d} loss {value:.4f} (ema {ema:.4f}) "
                    f"lr {opt.param_groups[0]['lr']:.2e} {time.perf_counter() - t0:6.1f}s")
        wall = time.perf_counter() - t0
    model.eval()
    meta = {"recipe": dataclasses.asdict(recipe), "recipe_key": recipe.key(), "code_version": CODE_VERSION,
            "steps_done": done, "wall_s": round(wall, 2), "num_threads": threads,
            "num_params": sum(p.numel() for p in model.parameters()), "losses": losses,
            "minutes_budget": minutes_budget}
    if log:
        log(f"[toy_pretrain] {done} steps in {wall:.1f}s on {threads} thread(s), "
            f"{meta['num_params'] / 1e6:.2f}M params")
    return model, tok, meta


def save_policy(model, tokenizer, meta: dict, out_dir: str | Path) -> Path:
    """HF checkpoint (safetensors, config, generation config) + tokenizer + ``toy_pretrain.json``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "toy_pretrain.json").write_text(json.dumps(meta, indent=1))
    return out


def pretrain_toy_policy(
    out_dir: str | Path,
    *,
    seed: int | None = None,
    steps: int | None = None,
    minutes_budget: float | None = None,
    recipe: ToyPretrainRecipe = DEFAULT_RECIPE,
    num_threads: int | None = None,
    log: Callable[[str], None] | None = print,
    log_every: int = 100,
) -> Path:
    """Train the toy policy from scratch and save it (HF format + tokenizer) to ``out_dir``.

    ``seed``/``steps`` override the recipe's; see ``train_toy_policy`` for ``minutes_budget``.
    Loads with ``AutoModelForCausalLM``/``AutoTokenizer`` (and vLLM). Returns ``out_dir``.
    """
    recipe = dataclasses.replace(recipe, **{k: v for k, v in (("seed", seed), ("steps", steps)) if v is not None})
    model, tok, meta = train_toy_policy(recipe=recipe, minutes_budget=minutes_budget, num_threads=num_threads,
                                        log=log, log_every=log_every)
    out = save_policy(model, tok, meta, out_dir)
    if log:
        log(f"[toy_pretrain] saved -> {out}")
    return out


# ----------------------------------------------------------------------------- shipped copy and cache

SHIPPED_DIR = Path(__file__).with_name("toy_policy")
SHIPPED_EVAL = "eval.json"           # evaluate_policy's report on the shipped weights


def shipped_policy(recipe: ToyPretrainRecipe = DEFAULT_RECIPE) -> Path | None:
    """The shipped policy folder when it was trained from ``recipe`` (same key), else None."""
    meta = SHIPPED_DIR / "toy_pretrain.json"
    if not meta.is_file():
        return None
    return SHIPPED_DIR if json.loads(meta.read_text()).get("recipe_key") == recipe.key() else None


@torch.no_grad()
def one_step_accuracy(model_dir: str | Path, *, rows: int = 48, seed: int = 99) -> float:
    """Greedy accuracy on ``rows`` fresh one-step problems, unhinted: a quick learned-or-not check
    (chance, guessing a two-digit answer, is about 0.01-0.1; the shipped policy gets most of them)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    maker = ExampleMaker(tok, load_templates(toy_task.TEMPLATE_DIR))
    problems = toy_task.generate_rows(rows, seed=seed, steps=(1,), unique=False)
    texts = sample_texts(model, tok, [maker.answer_prompt(r) for r in problems], max_new_tokens=64, temperature=0)
    return sum(integer_reward(t, r["answer"]) for t, r in zip(texts, problems)) / rows


LEARNED_MIN_ONE_STEP = 0.3     # below this the policy did not learn the arithmetic (chance is ~0.1)


def check_learned(model_dir: str | Path, log: Callable[[str], None] | None = print) -> float:
    """Warn (one line, with the fix) when a freshly trained policy answers one-step problems at chance."""
    acc = one_step_accuracy(model_dir)
    if log and acc < LEARNED_MIN_ONE_STEP:
        log(f"[toy_pretrain] WARNING: the policy trained here answers {acc:.2f} of one-step problems greedily "
            f"(< {LEARNED_MIN_ONE_STEP}): it learned the format, not the arithmetic, so GRPO and SAGE will start "
            "near chance. Try another --seed or more --steps, or use the default recipe (shipped weights).")
    return acc


def ship_policy(out_dir: str | Path = SHIPPED_DIR, *, num_threads: int | None = 1) -> Path:
    """Train the default recipe and write it, with its evaluation, as the shipped copy:

        python -m sage_megatron.tasks.toy_pretrain --ship          # 4-10 min train + ~30 s eval, 1 thread

    Refuses to ship a policy that did not learn (see ``check_learned``)."""
    out = Path(out_dir)
    with atomic_output_dir(out, overwrite=True) as tmp:
        pretrain_toy_policy(tmp, num_threads=num_threads)
        acc = one_step_accuracy(tmp)
        if acc < LEARNED_MIN_ONE_STEP:
            raise RuntimeError(f"the default recipe did not learn on this machine (one-step accuracy {acc:.2f}); "
                               f"the shipped copy in {out} is left as it was")
        report = evaluate_policy(tmp, rows_per_step=32, num_threads=num_threads)
        report["one_step_greedy_accuracy"] = acc
        report["command"] = "python -m sage_megatron.tasks.toy_pretrain --ship"
        (tmp / SHIPPED_EVAL).write_text(json.dumps(report, indent=1))
    return out


def cached_toy_policy(
    cache_root: str | Path,
    *,
    recipe: ToyPretrainRecipe = DEFAULT_RECIPE,
    num_threads: int | None = None,
    log: Callable[[str], None] | None = print,
) -> Path:
    """``cache_root/toy_policy-<recipe key>``: reused when present, else copied from the shipped policy
    (same recipe key) or trained here, then renamed in place.

    Copying or training writes into a temp dir under ``cache_root`` and renames it (atomic on one
    filesystem, ``atomic_output_dir``); a per-key file lock keeps two concurrent callers from training twice.
    """
    root = Path(cache_root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"toy_policy-{recipe.key()}"
    if (final / "config.json").is_file():
        return final
    with open(root / f".toy_policy-{recipe.key()}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (final / "config.json").is_file():      # another process finished while we waited
            return final
        with atomic_output_dir(final, overwrite=True) as tmp:   # replaces a stale partial dir (no config.json)
            shipped = shipped_policy(recipe)
            if shipped is not None:
                shutil.copytree(shipped, tmp, dirs_exist_ok=True)
                if log:
                    log(f"[toy_pretrain] copied the shipped toy policy ({shipped}) -> {final}")
            else:
                pretrain_toy_policy(tmp, recipe=recipe, num_threads=num_threads, log=log)
                check_learned(tmp, log=log)
    return final


# ----------------------------------------------------------------------------- evaluation


@torch.no_grad()
def sample_texts(model, tokenizer, prompts: Sequence[list[int]], *, max_new_tokens: int,
                 temperature: float = 1.0, batch_size: int = 256, seed: int = 0) -> list[str]:
    """HF ``generate`` (left-padded batches); temperature 1 means plain sampling (no top-k/top-p)."""
    torch.manual_seed(seed)
    pad = tokenizer.pad_token_id
    texts: list[str] = []
    for b in range(0, len(prompts), batch_size):
        chunk = prompts[b: b + batch_size]
        T = max(len(p) for p in chunk)
        ids = torch.full((len(chunk), T), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), T), dtype=torch.long)
        for i, p in enumerate(chunk):
            ids[i, T - len(p):] = torch.tensor(p)
            mask[i, T - len(p):] = 1
        gen_kwargs = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0) if temperature > 0 \
            else dict(do_sample=False)
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=pad, **gen_kwargs)
        texts += tokenizer.batch_decode(out[:, T:], skip_special_tokens=True)
    return texts


def evaluate_policy(
    model_dir: str | Path,
    *,
    rows_per_step: int = 64,
    steps: Sequence[int] = tuple(range(1, 9)),
    samples: int = 1,
    hint_level: str = "level_3",
    temperature: float = 1.0,
    seed: int = 1234,
    num_threads: int | None = None,
) -> dict:
    """Sampled accuracy per step count, unhinted and with ``hint_level``, plus the hint JSON parse rate.

    Rows are fresh (seeded) problems. Returns {"by_steps": {k: {"unhinted", "hinted", "parse"}},
    "parse_rate", "hint_used_ok", "wall_s"}; "hint_used_ok" is the hinted accuracy when the hint is
    the policy's OWN parsed ``hint_level`` (self-hinting end to end) instead of the reference hint.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with _Threads(num_threads):
        t0 = time.perf_counter()
        tok = AutoTokenizer.from_pretrained(model_dir)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        maker = ExampleMaker(tok, load_templates(toy_task.TEMPLATE_DIR))
        rows = []
        for k in steps:
            rows += toy_task.generate_rows(rows_per_step, seed=seed + k, steps=(k,), unique=False)
        rep = [r for r in rows for _ in range(samples)]
        unhinted = sample_texts(model, tok, [maker.answer_prompt(r) for r in rep], max_new_tokens=96, seed=seed)
        hinted = sample_texts(model, tok, [maker.answer_prompt(r, toy_task.hint_levels(r)[hint_level]) for r in rep],
                              max_new_tokens=96, seed=seed + 1)
        hint_out = sample_texts(model, tok, [maker.hint_prompt(r) for r in rows], max_new_tokens=200, seed=seed + 2)
        parsed = [parse_hint_json(t) for t in hint_out]
        level = toy_task.HINT_KEYS.index(hint_level) + 1
        own = [(r, p[level]) for r, p in zip(rows, parsed) if p is not None]
        own_out = sample_texts(model, tok, [maker.answer_prompt(r, h) for r, h in own], max_new_tokens=96,
                               seed=seed + 3) if own else []
        wall = time.perf_counter() - t0

    def acc(texts, rs):
        return sum(integer_reward(t, r["answer"]) for t, r in zip(texts, rs)) / max(1, len(rs))

    by_steps = {}
    for k in steps:
        idx = [i for i, r in enumerate(rep) if r["steps"] == k]
        hidx = [i for i, r in enumerate(rows) if r["steps"] == k]
        oidx = [i for i, (r, _) in enumerate(own) if r["steps"] == k]
        by_steps[k] = {
            "unhinted": acc([unhinted[i] for i in idx], [rep[i] for i in idx]),
            "hinted": acc([hinted[i] for i in idx], [rep[i] for i in idx]),
            "own_hint": acc([own_out[i] for i in oidx], [own[i][0] for i in oidx]) if oidx else float("nan"),
            "parse": sum(parsed[i] is not None for i in hidx) / len(hidx),
        }
    leaked = sum(1 for (r, h) in own if h.strip().split("\n")[-1] == r["solution"].split("\n")[-1]
                 and r["steps"] > 1)
    exact = sum(1 for (r, h) in own if h == toy_task.hint_levels(r)[hint_level])
    return {"by_steps": by_steps, "parse_rate": sum(p is not None for p in parsed) / len(parsed),
            "own_hints_with_final_line": leaked / max(1, len(own)),
            "own_hints_exact": exact / max(1, len(own)),
            "hint_level": hint_level, "samples": len(rep), "wall_s": round(wall, 1),
            "examples": {"unhinted": unhinted[:3], "hinted": hinted[:1], "hint": hint_out[-2:]}}


def format_report(report: dict) -> str:
    lines = [f"{'steps':>5} {'unhinted':>9} {'hinted':>7} {'own-hint':>9} {'parse':>6}"]
    for k, v in report["by_steps"].items():
        lines.append(f"{k:>5} {v['unhinted']:9.2f} {v['hinted']:7.2f} {v['own_hint']:9.2f} {v['parse']:6.2f}")
    lines.append(f"hint JSON parse rate {report['parse_rate']:.2f}; own {report['hint_level']} hints equal to the "
                 f"reference one {report['own_hints_exact']:.2f}, revealing the final line "
                 f"{report['own_hints_with_final_line']:.2f}")
    lines.append(f"hinted = the reference {report['hint_level']} hint, own-hint = the policy's own parsed "
                 f"{report['hint_level']} hint; {report['samples']} samples per column; eval {report['wall_s']}s")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="output dir (or cache root with --cache)")
    ap.add_argument("--cache", action="store_true", help="use cached_toy_policy(out) with the default recipe")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--minutes", type=float, default=None, help="wall-time budget")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--eval", action="store_true", help="measure accuracy/hints after training")
    ap.add_argument("--eval-only", action="store_true", help="evaluate an existing --out model")
    ap.add_argument("--rows-per-step", type=int, default=64)
    ap.add_argument("--json", default=None, help="write the eval report here")
    ap.add_argument("--ship", action="store_true",
                    help=f"train the default recipe into the shipped copy ({SHIPPED_DIR}) with its eval report")
    args = ap.parse_args(argv)
    if args.ship:
        print(f"[toy_pretrain] shipped -> {ship_policy(num_threads=args.threads or 1)}")
        return 0
    if args.eval_only:
        path = Path(args.out)
    elif args.cache:
        path = cached_toy_policy(args.out, num_threads=args.threads)
    else:
        path = pretrain_toy_policy(args.out, seed=args.seed, steps=args.steps, minutes_budget=args.minutes,
                                   num_threads=args.threads)
    if args.eval or args.eval_only:
        report = evaluate_policy(path, rows_per_step=args.rows_per_step, num_threads=args.threads)
        print(format_report(report))
        for kind, ex in report["examples"].items():
            print(f"--- {kind} sample: {ex!r}")
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
