#!/usr/bin/env python
"""Multi-node scaling benchmark: per-phase step times over node counts and layouts, beside the
performance model's prediction for the same configuration.

    python bench/scaling.py --json runs/scaling.json --plot runs/scaling.png            # stand-in
    python bench/scaling.py --nodes 1,2 --layouts tp1pp1 --json out.json                  # explicit grid
    SAGE_BENCH_TRAIN_CMD='sage-megatron train --config configs/x.yaml parallel.tp={tp} \
        parallel.pp={pp} rollout.num_engines={engines} rollout.placement=spread run.steps={steps} \
        run.dir={run_dir}' python bench/scaling.py --model 7b --json out.json             # real trainer
    python bench/scaling.py --from-jsonl nodes=2,tp=1,pp=1:run/metrics.jsonl --json out.json
    # the real trainer on a CPU Ray cluster, weak scaling (4 prompts per node), one engine per node:
    python bench/scaling.py --nodes 1,2 --scaling weak --batch 4 --hardware cpu --json out.json \
        --train-cmd 'python -m sage_megatron.cli train --config configs/toy.yaml model.hf_dir=HF \
        rollout.num_engines={engines} rollout.placement=spread data.batch_size={batch} \
        run.steps={steps} run.dir={run_dir} eval.data= logging.tensorboard=false'

Inside a Slurm job use scripts/slurm/scaling.sbatch, which brings up Ray on every node first
(SAGE_SCALING_TRAINER=1 there builds the real-trainer template above).

Two sources of per-step metrics, one reader. Every source ends up as a JSONL file with one object
per step and keys time/rollout, time/hint, time/logprob, time/update, time/weight_sync, time/step
(the trainer's metrics; its time/hint_gen + time/hint_rollout are read as time/hint, and
time/other = time/step - the five phases: reward, advantages, reference log-probs, broadcasts);
the harness drops --warmup steps and reports medians.
  * the trainer: --train-cmd / $SAGE_BENCH_TRAIN_CMD, a command template run once per
    configuration with {nodes} {tp} {pp} {dp} {gpus_per_node} {steps} {metrics} {run_dir}
    {engines} (= nodes * --engines-per-node) {batch} (--batch, times nodes with --scaling weak)
    filled in (and the same values in SAGE_BENCH_* / SAGE_METRICS_JSONL environment variables); it
    must write its per-step metrics to {metrics} (`run.dir={run_dir}` does: the trainer writes
    run.dir/metrics.jsonl). The prediction: --hardware h100 uses --model on H100 nodes (GPU
    clusters); --hardware cpu predicts the run that happened on this machine: the model from the
    run's config.json (model.hf_dir's config.json, else --model), its batch, group size, mini-batches,
    measured mean response length and hint share, training on the head node's ranks, one engine
    per node, CPU_THIS_MACHINE peaks and the default efficiency factors (no GPU swap).
  * the stand-in (no trainer given; bench/scaling_standin.py): a workload shaped like one GRPO
    step, run with Ray on k nodes (one actor pinned per node, torch.distributed gloo between them):
    rollout = batched decode steps that read all weights plus a growing KV cache, logprob = a
    forward pass, update = forward and backward matmuls plus a gradient all-reduce across nodes,
    weight_sync = each node's hand-over copy of the weights into its "engine". It uses the perf
    model's "tiny" model, and the prediction uses this machine's measured matmul FLOP/s, copy
    bandwidth and inter-node bandwidth with all efficiency factors at 1 -- so measured / predicted
    is the share of time the model does not explain (Python and scheduling overheads, contention).
On this machine the emulated nodes share 2 CPU cores (and other users' load): stand-in numbers
test the harness and the launch path, not hardware scaling.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import shlex
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.scaling_standin import StandIn, run_stand_in, stand_in_prediction  # noqa: E402
from sage_megatron.perf.catalogue import CPU_THIS_MACHINE, H100_SXM, MODELS, ModelSpec  # noqa: E402
from sage_megatron.perf.formulas import Efficiency, Layout, Workload, default_rollout_tp, step_time  # noqa: E402

PHASES = ("time/rollout", "time/hint", "time/logprob", "time/update", "time/weight_sync")
KEYS = PHASES + ("time/step",)
HINT_PARTS = ("time/hint_gen", "time/hint_rollout")
"""The trainer's hint phases (sage_megatron/algo/strategies.py): summed into time/hint."""
OTHER = "time/other"
"""time/step minus the five phases (reward, advantages, reference log-probs, broadcasts, ...)."""


# ----------------------------------------------------------------------------------------------
# metrics


def read_metrics(path: str | Path, *, warmup: int = 0) -> list[dict]:
    """Per-step rows of a metrics JSONL (blank and non-JSON lines skipped), first `warmup` dropped."""
    rows = []
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if not line.startswith("{"):
            continue
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if "time/hint" not in row and any(k in row for k in HINT_PARTS):
            row["time/hint"] = sum(float(row.get(k) or 0.0) for k in HINT_PARTS)
        if OTHER not in row and row.get("time/step") is not None:
            row[OTHER] = max(0.0, float(row["time/step"]) - sum(float(row.get(k) or 0.0) for k in PHASES))
        if any(k in row for k in KEYS):
            rows.append(row)
    return rows[warmup:]


def summarize(rows: list[dict]) -> dict[str, float]:
    """Median of each time/* key present; time/step = sum of phases when the source lacks it;
    time/other = median over steps of (step - phases), else step - phases of the medians."""
    out = {}
    for k in KEYS + (OTHER,):
        vals = [float(r[k]) for r in rows if k in r and r[k] is not None]
        if vals:
            out[k] = statistics.median(vals)
    if "time/step" not in out and any(k in out for k in PHASES):
        out["time/step"] = sum(out.get(k, 0.0) for k in PHASES)
    if "time/step" in out and OTHER not in out:
        out[OTHER] = max(0.0, out["time/step"] - sum(out.get(k, 0.0) for k in PHASES))
    return out


def with_other(pred: dict[str, float]) -> dict[str, float]:
    """A prediction with time/other (its fixed per-step overhead) like the measured side."""
    if "time/step" in pred:
        pred = {**pred, OTHER: max(0.0, pred["time/step"] - sum(pred.get(k, 0.0) for k in PHASES))}
    return pred


def parse_layout(s: str) -> tuple[int, int]:
    m = re.fullmatch(r"tp(\d+)pp(\d+)", s.strip())
    if not m:
        raise argparse.ArgumentTypeError(f"layout {s!r}: expected like tp2pp1")
    return int(m.group(1)), int(m.group(2))


# ----------------------------------------------------------------------------------------------
# the trainer


def trainer_values(*, nodes: int, tp: int, pp: int, gpus_per_node: int, steps: int, metrics_path: Path,
                   engines_per_node: int = 1, batch: int | None = None, scaling: str = "strong") -> dict:
    """The placeholders of a trainer command template for one configuration (paths shell-quoted)."""
    devices = nodes * gpus_per_node
    if devices % (tp * pp):
        raise ValueError(f"{devices} GPUs not divisible by tp*pp={tp * pp}")
    vals = {"nodes": nodes, "tp": tp, "pp": pp, "dp": devices // (tp * pp), "gpus_per_node": gpus_per_node,
            "steps": steps, "metrics": shlex.quote(str(metrics_path)),
            "run_dir": shlex.quote(str(metrics_path.parent)), "engines": nodes * engines_per_node}
    if batch is not None:
        vals["batch"] = batch * nodes if scaling == "weak" else batch
    return vals


def run_trainer(*, template: str, nodes: int, tp: int, pp: int, gpus_per_node: int, steps: int,
                metrics_path: Path, timeout: float, engines_per_node: int = 1, batch: int | None = None,
                scaling: str = "strong") -> None:
    vals = trainer_values(nodes=nodes, tp=tp, pp=pp, gpus_per_node=gpus_per_node, steps=steps,
                          metrics_path=metrics_path, engines_per_node=engines_per_node, batch=batch, scaling=scaling)
    try:
        cmd = template.format(**vals)
    except KeyError as e:
        raise ValueError(f"trainer template uses {{{e.args[0]}}}, which is not set "
                         f"(placeholders: {', '.join(sorted(vals))}; {{batch}} needs --batch)") from None
    metrics_path.parent.mkdir(parents=True, exist_ok=True)
    if metrics_path.exists():
        metrics_path.unlink()   # never read a previous run's steps
    env = {**os.environ, "SAGE_METRICS_JSONL": str(metrics_path),
           **{f"SAGE_BENCH_{k.upper()}": str(v) for k, v in vals.items() if k not in ("metrics", "run_dir")}}
    print(f"[scaling] {cmd}", flush=True)
    p = subprocess.run(["bash", "-c", cmd], env=env, timeout=timeout)
    if p.returncode != 0:
        raise RuntimeError(f"trainer exited with {p.returncode} for nodes={nodes} tp={tp} pp={pp}: {cmd}")
    if not metrics_path.exists():
        raise RuntimeError(f"trainer wrote no metrics to {metrics_path} (use the {{metrics}} placeholder)")


def model_from_hf_config(path: str | Path) -> ModelSpec:
    """A perf-model ModelSpec from an HF config.json (Llama / Qwen2 family keys)."""
    c = json.loads(Path(path).read_text())
    return ModelSpec(f"hf:{Path(path).parent.name}", layers=c["num_hidden_layers"], hidden=c["hidden_size"],
                     ffn=c["intermediate_size"], heads=c["num_attention_heads"],
                     kv_heads=c.get("num_key_value_heads") or c["num_attention_heads"], vocab=c["vocab_size"],
                     head_dim=c.get("head_dim") or 0, tied_embeddings=bool(c.get("tie_word_embeddings")))


def cpu_trainer_prediction(run_dir: Path, rows: list[dict], *, engines: int, prompt_tokens: float,
                           fallback_model: str = "tiny") -> tuple[dict, dict]:
    """The perf model for a trainer run on this CPU machine: (prediction, what it assumed).

    Model and workload come from the run itself (run_dir/config.json and the measured rows):
    batch x group size sequences, the measured mean response length (uniform up to max_tokens),
    the measured share of prompts hinted and hint levels per hinted prompt, optim.mini_batches
    optimizer steps. Training runs on the head node (tp*pp*dp local ranks, one "device" each),
    rollout on `engines` engines of one "device" each (not colocated), CPU_THIS_MACHINE peaks,
    default efficiency factors except no GPU swap."""
    cfg = json.loads((run_dir / "config.json").read_text())
    hf_cfg = Path(cfg["model"]["hf_dir"]) / "config.json"
    model = model_from_hf_config(hf_cfg) if hf_cfg.is_file() else MODELS[fallback_model]

    def mean(key: str, default: float) -> float:
        vals = [float(r[key]) for r in rows if r.get(key) is not None]
        return statistics.mean(vals) if vals else default

    r, d, par = cfg["rollout"], cfg["data"], cfg["parallel"]
    prompts = int(d["batch_size"])
    triggered = mean("hint/triggered", 0.0)
    work = Workload(prompts=prompts, samples=int(r["group_size"]), prompt_tokens=prompt_tokens,
                    response_tokens=max(1.0, mean("response_len/mean", r["max_tokens"] / 2)),
                    max_response_tokens=int(r["max_tokens"]), length_dist="uniform",
                    optimizer_steps=int(cfg["optim"]["mini_batches"]),
                    logprob_passes=1 + (cfg["algorithm"].get("kl_coef", 0) > 0),
                    hint_fraction=min(1.0, triggered / prompts) if prompts else 0.0,
                    hint_levels=mean("hint/hinted_total", 0.0) / triggered if triggered else 1.0)
    ranks = int(par["tp"]) * int(par["pp"]) * int(par["dp"])
    lay = Layout(nodes=1, devices_per_node=ranks, tp=int(par["tp"]), pp=int(par["pp"]), rollout_tp=ranks,
                 colocated=False, rollout_nodes=engines)
    eff = dataclasses.replace(Efficiency(), colocated_swap=False)
    pred = with_other(step_time(model, lay, work, CPU_THIS_MACHINE, eff).as_metrics())
    assumed = {"model": dataclasses.asdict(model), "params": model.params, "hardware": CPU_THIS_MACHINE.name,
               "workload": dataclasses.asdict(work), "engines": engines, "train_ranks": ranks}
    return pred, assumed


# ----------------------------------------------------------------------------------------------
# report


def table(results: list[dict]) -> str:
    """One line per configuration: measured / predicted per phase; speedup and efficiency against
    the smallest node count of the same source and layout, in work per second: with a fixed batch
    (strong scaling) speedup = t_1 / t_n; with a batch that grows with the nodes (weak scaling,
    "batch" in the rows) speedup = (batch_n / batch_1) * t_1 / t_n. Efficiency = speedup / node ratio."""
    hdr = ["nodes", "layout", "source", "batch", "step meas", "step pred", "meas/pred", "rollout m/p", "hint m/p",
           "logprob m/p", "update m/p", "sync m/p", "other m/p", "speedup", "efficiency"]
    lines = [" | ".join(hdr)]
    first: dict[str, dict] = {}
    for r in results:
        m, p = r["measured"], r["predicted"]
        key = f"{r['source']} {r['layout']}"
        first.setdefault(key, r)
        step = m.get("time/step", math.nan)
        step0 = first[key]["measured"].get("time/step", math.nan)
        work = (r.get("batch") or 1) / (first[key].get("batch") or 1)
        speedup = work * step0 / step if step else math.nan
        eff = speedup / (r["nodes"] / first[key]["nodes"])
        ratio = step / p["time/step"] if p.get("time/step") else math.nan

        def mp(k: str) -> str:
            return f"{m.get(k, math.nan):.3g}/{p.get(k, math.nan):.3g}"

        lines.append(" | ".join([str(r["nodes"]), r["layout"], r["source"], str(r.get("batch", "-")), f"{step:.3g}",
                                 f"{p.get('time/step', math.nan):.3g}", f"{ratio:.2f}", mp("time/rollout"),
                                 mp("time/hint"), mp("time/logprob"), mp("time/update"), mp("time/weight_sync"),
                                 mp(OTHER), f"{speedup:.2f}x", f"{eff:.0%}"]))
    return "\n".join(lines)


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    groups: dict[str, list[dict]] = {}
    for r in results:
        groups.setdefault(f"{r['source']} {r['layout']}", []).append(r)
    for key, rs in groups.items():
        xs = [r["nodes"] for r in rs]
        line, = ax1.plot(xs, [r["measured"].get("time/step", math.nan) for r in rs], "o-", label=f"{key} measured")
        ax1.plot(xs, [r["predicted"].get("time/step", math.nan) for r in rs], "s--", color=line.get_color(),
                 label=f"{key} predicted")
    ax1.set_xlabel("nodes")
    ax1.set_ylabel("time/step (s)")
    ax1.set_xscale("log", base=2)
    ax1.set_title("step time")
    ax1.legend(fontsize=7)
    labels = [f"{r['nodes']}n {r['layout']}" + (f" b{r['batch']}" if r.get("batch") else "") for r in results]
    bottom = [0.0] * len(results)
    for k in PHASES + (OTHER,):
        vals = [r["measured"].get(k, 0.0) for r in results]
        ax2.bar(labels, vals, bottom=bottom, label=k.split("/")[1])
        bottom = [a + b for a, b in zip(bottom, vals)]
    ax2.set_ylabel("s (measured)")
    ax2.set_title("phases")
    ax2.legend(fontsize=7)
    ax2.tick_params(axis="x", labelrotation=45, labelsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _ray_connect(address: str | None) -> int:
    import ray

    if address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=address or os.environ["RAY_ADDRESS"], logging_level="WARNING", log_to_driver=False)
    else:  # no cluster: a local one-node Ray
        ray.init(num_cpus=max(2, os.cpu_count() or 2), logging_level="WARNING", log_to_driver=False,
                 include_dashboard=False)
    return len([n for n in ray.nodes() if n["Alive"]])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--json", required=True, type=Path, help="output JSON")
    ap.add_argument("--plot", type=Path, help="output PNG")
    ap.add_argument("--nodes", help="comma list of node counts [powers of 2 up to the cluster size]")
    ap.add_argument("--layouts", default="tp1pp1", help="comma list like tp1pp1,tp2pp1 [tp1pp1]")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--train-cmd", default=os.environ.get("SAGE_BENCH_TRAIN_CMD"),
                    help="trainer command template [$SAGE_BENCH_TRAIN_CMD; unset = stand-in]")
    ap.add_argument("--from-jsonl", action="append", default=[],
                    help="nodes=N,tp=T,pp=P:PATH -- summarize an existing metrics JSONL instead of running")
    ap.add_argument("--model", default=None, help="perf-model preset for predictions [tiny (stand-in) / 7b]")
    ap.add_argument("--gpus-per-node", type=int, default=8)
    ap.add_argument("--engines-per-node", type=int, default=1, help="trainer: {engines} = nodes * this [1]")
    ap.add_argument("--batch", type=int, default=None,
                    help="trainer: prompts per step for {batch} (per node with --scaling weak)")
    ap.add_argument("--scaling", choices=["strong", "weak"], default="strong",
                    help="strong: same batch at every node count; weak: {batch} and the predicted "
                         "workload grow with the nodes [strong]")
    ap.add_argument("--hardware", choices=["auto", "h100", "cpu"], default="auto",
                    help="prediction for trainer runs: H100 nodes (--model, --prompts ...) or this CPU "
                         "machine (model and workload from the run) [auto: cpu without CUDA]")
    ap.add_argument("--prompts", type=int, default=Workload.prompts)
    ap.add_argument("--samples", type=int, default=Workload.samples)
    ap.add_argument("--prompt-tokens", type=float, default=Workload.prompt_tokens)
    ap.add_argument("--response-tokens", type=float, default=Workload.response_tokens)
    ap.add_argument("--max-response-tokens", type=int, default=Workload.max_response_tokens)
    ap.add_argument("--ray-address", default=None)
    ap.add_argument("--timeout", type=float, default=3600, help="per trainer run, seconds")
    a = ap.parse_args(argv)

    layouts = [parse_layout(s) for s in a.layouts.split(",") if s.strip()]
    work_dir = a.json.with_suffix("")
    work_dir.mkdir(parents=True, exist_ok=True)
    results: list[dict] = []
    gpu_work = Workload(prompts=a.prompts, samples=a.samples, prompt_tokens=a.prompt_tokens,
                        response_tokens=a.response_tokens, max_response_tokens=a.max_response_tokens)

    def gpu_prediction(nodes: int, tp: int, pp: int) -> dict:
        model = MODELS[a.model or "7b"]
        lay = Layout(nodes=nodes, devices_per_node=a.gpus_per_node, tp=tp, pp=pp,
                     rollout_tp=default_rollout_tp(model, H100_SXM))
        work = dataclasses.replace(gpu_work, prompts=gpu_work.prompts * nodes) if a.scaling == "weak" else gpu_work
        try:
            return with_other(step_time(model, lay, work, H100_SXM).as_metrics())
        except ValueError as e:
            print(f"[scaling] no prediction for nodes={nodes} tp={tp} pp={pp}: {e}", file=sys.stderr)
            return {}

    if a.from_jsonl:
        for item in a.from_jsonl:
            spec, _, path = item.partition(":")
            kv = dict(x.split("=") for x in spec.split(","))
            n, tp, pp = int(kv["nodes"]), int(kv.get("tp", 1)), int(kv.get("pp", 1))
            results.append({"nodes": n, "layout": f"tp{tp}pp{pp}", "tp": tp, "pp": pp, "source": "jsonl",
                            "metrics_jsonl": path, "measured": summarize(read_metrics(path, warmup=a.warmup)),
                            "predicted": gpu_prediction(n, tp, pp), "prediction_model": a.model or "7b"})
            if a.batch is not None:
                results[-1]["batch"] = a.batch * n if a.scaling == "weak" else a.batch
    else:
        available = _ray_connect(a.ray_address) if not a.train_cmd else int(os.environ.get("SAGE_NUM_NODES", "1"))
        nodes_list = ([int(x) for x in a.nodes.split(",")] if a.nodes
                      else [2 ** i for i in range(int(math.log2(max(1, available))) + 1)])
        stand = StandIn()
        model = MODELS[a.model or "tiny"]
        hardware = a.hardware
        if hardware == "auto":
            import torch

            hardware = "h100" if torch.cuda.is_available() else "cpu"
        for n in nodes_list:
            for tp, pp in layouts:
                metrics = work_dir / f"n{n}-tp{tp}pp{pp}.jsonl"
                row = {"nodes": n, "layout": f"tp{tp}pp{pp}", "tp": tp, "pp": pp, "metrics_jsonl": str(metrics)}
                t0 = time.time()
                if a.train_cmd:
                    metrics = work_dir / f"n{n}-tp{tp}pp{pp}" / "metrics.jsonl"
                    row["metrics_jsonl"] = str(metrics)
                    run_trainer(template=a.train_cmd, nodes=n, tp=tp, pp=pp, gpus_per_node=a.gpus_per_node,
                                steps=a.steps + a.warmup, metrics_path=metrics, timeout=a.timeout,
                                engines_per_node=a.engines_per_node, batch=a.batch, scaling=a.scaling)
                    row.update(source="trainer", engines=n * a.engines_per_node, scaling=a.scaling)
                    if a.batch is not None:
                        row["batch"] = a.batch * n if a.scaling == "weak" else a.batch
                    if hardware == "cpu":
                        pred, assumed = cpu_trainer_prediction(
                            metrics.parent, read_metrics(metrics, warmup=a.warmup), engines=n * a.engines_per_node,
                            prompt_tokens=a.prompt_tokens, fallback_model=a.model or "tiny")
                        row.update(predicted=pred, prediction_model=assumed["model"]["name"],
                                   prediction_assumed=assumed)
                    else:
                        row.update(predicted=gpu_prediction(n, tp, pp), prediction_model=a.model or "7b")
                else:
                    if (tp, pp) != (1, 1):
                        print(f"[scaling] stand-in runs data parallel only: skipping tp{tp}pp{pp}", file=sys.stderr)
                        continue
                    hw = run_stand_in(nodes=n, stand=stand, steps=a.steps + a.warmup, metrics_path=metrics,
                                      model=model)
                    row.update(source="stand-in", hardware=hw, stand_in=dataclasses.asdict(stand),
                               predicted=with_other(stand_in_prediction(nodes=n, stand=stand, model=model,
                                                                        measured=hw)),
                               prediction_model=model.name)
                row["measured"] = summarize(read_metrics(metrics, warmup=a.warmup))
                row["wall_s"] = round(time.time() - t0, 2)
                results.append(row)
                print(f"[scaling] nodes={n} tp{tp}pp{pp}: measured {row['measured'].get('time/step', math.nan):.3g} s"
                      f" / predicted {row['predicted'].get('time/step', math.nan):.3g} s", flush=True)

    if not results:
        print("no configuration ran", file=sys.stderr)
        return 1
    print(table(results))
    out = {"created": time.strftime("%Y-%m-%dT%H:%M:%S"), "host": socket.gethostname(),
           "keys": list(KEYS) + [OTHER], "results": results}
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps(out, indent=1, default=str))
    print(f"wrote {a.json}")
    if a.plot:
        plot(results, a.plot)
        print(f"wrote {a.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
