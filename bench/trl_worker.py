"""The TRL side of bench/vs_trl.py: trains with TRL's ``GRPOTrainer`` in its own interpreter.

    python bench/trl_worker.py WORK_DIR      # run by bench/vs_trl.py (run_trl), never by hand

bench/vs_trl.py writes WORK_DIR/spec.json (HF folder, dataset rows, GRPOConfig kwargs, torch
threads) and starts this file by path with the TRL folder of bench/trl_install.py on PYTHONPATH;
it trains, times each step with a ``TrainerCallback`` (generation and reward calls too) and writes
WORK_DIR/result.json (steps, the effective GRPOConfig, whether the prompt token ids equal ours,
versions). Heavy imports (torch, transformers, trl) happen inside `train` only.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.trl_install import installed_version  # noqa: E402


def train(work: Path) -> None:
    """Runs in the subprocess with the TRL folder on PYTHONPATH: train, write work/result.json."""
    spec = json.loads((work / "spec.json").read_text())
    t_start = time.perf_counter()
    import torch
    import transformers
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from sage_megatron.algo.reward import batch_math_reward
    from sage_megatron.algo.templates import chat_encoder

    if spec.get("torch_threads"):
        torch.set_num_threads(int(spec["torch_threads"]))
    tok = AutoTokenizer.from_pretrained(spec["hf_dir"])
    model = AutoModelForCausalLM.from_pretrained(spec["hf_dir"], dtype=torch.float32)
    rows = spec["rows"]
    # The prompt ids TRL will generate from (its conversational path) must be the ones ours uses.
    encode = chat_encoder(tok)
    trl_ids = [list(tok.apply_chat_template(r["prompt"], add_generation_prompt=True, tokenize=True,
                                            return_dict=True)["input_ids"]) for r in rows]
    prompt_ids_match = all(list(encode(r["prompt"])) == ids for r, ids in zip(rows, trl_ids))

    timers = {"generate": 0.0, "reward": 0.0}

    def reward_fn(prompts, completions, answer, **_):
        t0 = time.perf_counter()
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        out = batch_math_reward(list(zip(texts, answer)), extractor=spec.get("extractor", "boxed"),
                                workers=spec.get("reward_workers", 1))
        timers["reward"] += time.perf_counter() - t0
        return out

    reward_fn.__name__ = "math_reward"

    steps: list[dict] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            timers.update(generate=0.0, reward=0.0)
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            dt = time.perf_counter() - self.t0
            gen, rew = timers["generate"], timers["reward"]
            steps.append({"step": state.global_step, "seconds": dt,
                          "phases": {"generate": gen, "reward": rew, "other": dt - gen - rew}})

    kwargs = dict(spec["trl_kwargs"])
    args = GRPOConfig(**kwargs)
    trainer = GRPOTrainer(model=model, reward_funcs=reward_fn, args=args, train_dataset=Dataset.from_list(rows),
                          processing_class=tok, callbacks=[StepTimer()])
    inner = getattr(trainer, "_generate_single_turn", None)
    if inner is not None:
        def timed_generate(*a, **kw):
            t0 = time.perf_counter()
            try:
                return inner(*a, **kw)
            finally:
                timers["generate"] += time.perf_counter() - t0

        trainer._generate_single_turn = timed_generate
    t_ready = time.perf_counter()
    trainer.train()
    t_done = time.perf_counter()

    logs = {int(e["step"]): e for e in trainer.state.log_history if "step" in e and "reward" in e}
    for s in steps:
        e = logs.get(s["step"], {})
        s["response_tokens"] = e.get("completions/mean_length")
        s["accuracy"] = e.get("reward")
        s["trl_step_time"] = e.get("step_time")   # TRL's own training_step timer, for cross-checking

    def plain(v):
        v = getattr(v, "value", v)  # enums (lr_scheduler_type, ...)
        return v if isinstance(v, (str, int, float, bool, type(None))) else str(v)

    effective = {k: plain(getattr(args, k)) for k in (
        *kwargs, "generation_batch_size", "steps_per_generation") if k != "output_dir"}
    (work / "result.json").write_text(json.dumps({
        "steps": steps, "effective_config": effective, "prompt_ids_match": prompt_ids_match,
        "prompt_tokens_mean": sum(map(len, trl_ids)) / len(trl_ids),
        "setup_seconds": t_ready - t_start, "train_seconds": t_done - t_ready,
        "torch_threads": torch.get_num_threads(),
        "attn_implementation": getattr(model.config, "_attn_implementation", None),
        "versions": {"trl": trl.__version__, "transformers": transformers.__version__, "torch": torch.__version__,
                     "datasets": installed_version("datasets"), "accelerate": installed_version("accelerate")},
    }, indent=1))


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: trl_worker.py WORK_DIR (WORK_DIR/spec.json in, WORK_DIR/result.json out)", file=sys.stderr)
        return 2
    train(Path(args[0]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
