#!/usr/bin/env python
"""Multi-node scaling benchmark: per-phase step times over node counts and layouts, beside the
performance model's prediction for the same configuration.

    python bench/scaling.py --json runs/scaling.json --plot runs/scaling.png            # stand-in
    python bench/scaling.py --nodes 1,2 --layouts tp1pp1 --json out.json                  # explicit grid
    SAGE_BENCH_TRAIN_CMD='sage-megatron train --config configs/x.yaml parallel.tp={tp} \
        parallel.pp={pp} rollout.num_engines={engines} rollout.placement=spread run.steps={steps} \
        run.dir={run_dir}' python bench/scaling.py --model 7b --json out.json             # real trainer
    python bench/scaling.py --from-jsonl nodes=2,tp=1,pp=1:run/metrics.jsonl --json out.json
    # the real trainer on a CPU Ray cluster, its ranks spread one per node (dp = nodes), one engine
    # per node, weak (4 prompts per node) AND strong (4 prompts in all) scaling, constants fitted:
    python bench/scaling.py --nodes 1,2 --scaling weak,strong --batch 4 --gpus-per-node 1 \
        --hardware cpu --json out.json \
        --train-cmd 'python -m sage_megatron.cli train --config configs/toy.yaml model.hf_dir=HF \
        parallel.tp={tp} parallel.pp={pp} parallel.dp={dp} cluster.ranks_per_node={ranks_per_node} \
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
    configuration with {nodes} {tp} {pp} {dp} (= nodes * --gpus-per-node / (tp * pp))
    {gpus_per_node} {ranks_per_node} (both = --gpus-per-node: trainer ranks per node, on CPU too)
    {steps} {metrics} {run_dir} {engines} (= nodes * --engines-per-node) {batch} (--batch, times
    nodes with --scaling weak) filled in (and the same values in SAGE_BENCH_* / SAGE_METRICS_JSONL
    environment variables); it must write its per-step metrics to {metrics} (`run.dir={run_dir}`
    does: the trainer writes run.dir/metrics.jsonl). With `parallel.dp={dp}
    cluster.ranks_per_node={ranks_per_node}` in the template the training actor spans the nodes
    (rank r on node r // ranks_per_node), so an n-node run all-reduces gradients across nodes.
    --scaling weak,strong (or both) runs both sweeps in one invocation; rows carry "scaling", and a
    configuration identical in both (1 node: the same batch) runs once. The prediction:
    --hardware h100 uses --model on H100 nodes (GPU clusters); --hardware cpu predicts the run that
    happened on this machine: the model from the run's config.json (model.hf_dir's config.json,
    else --model), its batch, group size, mini-batches, measured mean response length and hint
    share, the run's own rank placement (cluster.ranks_per_node; 0 = every rank on the first
    node, the CPU default) so a data-parallel group across nodes pays the inter-node all-reduce,
    one single-device engine per engine (not colocated), CPU_THIS_MACHINE peaks and the fitted
    calibration perf.formulas.CPU_FITTED_EFFICIENCY.
  * --fit (on by default for --hardware cpu trainer runs): after the sweep, the Efficiency
    constants (compute, decode_step_overhead_s, sync_tensor_overhead_s, step_overhead_s; see
    --fit-params) are fitted to the measured rows by perf.formulas.fit_efficiency, starting from the
    prediction's calibration; printed as a paste-able `CPU_FITTED_EFFICIENCY = Efficiency(...)` line
    and a second table (measured / predicted before the fit, after it, and leave-one-out: fitted on
    every other run, so that column is the fit's honest error); the JSON's "fit" section holds the
    same. The JSON also records the command line, git commit, core count and load average at start.
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
from sage_megatron.perf.formulas import (  # noqa: E402
    CPU_FITTED_EFFICIENCY, CPU_FITTED_EFFICIENCY_SOURCE, DEFAULT_FIT_PARAMS, FIT_ROWS, Efficiency, FitRun, Layout,
    Workload, default_rollout_tp, efficiency_source, fit_efficiency, leave_one_out, predict_metrics, step_time,
)
from sage_megatron.provenance import default_command, provenance, run_start  # noqa: E402

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
    """The placeholders of a trainer command template for one configuration (paths shell-quoted).
    {ranks_per_node} = {gpus_per_node}: trainer ranks per node (on CPU, where there are no GPUs, too);
    dp = nodes * ranks_per_node / (tp * pp), so the actor fills `nodes` nodes."""
    devices = nodes * gpus_per_node
    if devices % (tp * pp):
        raise ValueError(f"{devices} GPUs (trainer ranks) not divisible by tp*pp={tp * pp}")
    vals = {"nodes": nodes, "tp": tp, "pp": pp, "dp": devices // (tp * pp), "gpus_per_node": gpus_per_node,
            "ranks_per_node": gpus_per_node,
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


def cpu_trainer_setup(run_dir: Path, rows: list[dict], *, engines: int, prompt_tokens: float,
                      fallback_model: str = "tiny") -> tuple[ModelSpec, Layout, Workload, dict]:
    """What the perf model needs to predict a trainer run on this CPU machine: (model, layout,
    workload, what it assumed).

    Model and workload come from the run itself (run_dir/config.json and the measured rows):
    batch x group size sequences, the measured mean response length (uniform up to max_tokens),
    the measured share of prompts hinted and hint levels per hinted prompt, optim.mini_batches
    optimizer steps. Training uses the run's own placement: tp*pp*dp ranks, one "device" each,
    cluster.ranks_per_node per node (0 = every rank on the first node, the CPU default), i.e.
    Layout(nodes=ranks/rpn, devices_per_node=rpn): a data-parallel group across nodes pays the
    inter-node all-reduce. Rollout on `engines` engines of one "device" each, not colocated."""
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
    tp, pp = int(par["tp"]), int(par["pp"])
    ranks = tp * pp * int(par["dp"])
    rpn = min(ranks, int((cfg.get("cluster") or {}).get("ranks_per_node") or 0) or ranks)
    if ranks % rpn:
        raise ValueError(f"{ranks} trainer ranks at cluster.ranks_per_node={rpn} leave the last node part-filled, "
                         "which the perf model's Layout cannot express")
    lay = Layout(nodes=ranks // rpn, devices_per_node=rpn, tp=tp, pp=pp, rollout_tp=1, colocated=False,
                 rollout_nodes=engines, rollout_devices_per_node=1)
    assumed = {"model": dataclasses.asdict(model), "params": model.params, "hardware": CPU_THIS_MACHINE.name,
               "workload": dataclasses.asdict(work), "engines": engines, "train_ranks": ranks,
               "ranks_per_node": rpn, "train_nodes": lay.nodes, "layout": dataclasses.asdict(lay)}
    return model, lay, work, assumed


def cpu_trainer_prediction(run_dir: Path, rows: list[dict], *, engines: int, prompt_tokens: float,
                           fallback_model: str = "tiny",
                           eff: Efficiency = CPU_FITTED_EFFICIENCY) -> tuple[dict, dict, FitRun]:
    """The perf model for a trainer run on this CPU machine: (prediction, what it assumed, the run as
    a FitRun for --fit); the run as `cpu_trainer_setup` reads it, CPU_THIS_MACHINE peaks, `eff` (the
    fitted CPU calibration)."""
    model, lay, work, assumed = cpu_trainer_setup(run_dir, rows, engines=engines, prompt_tokens=prompt_tokens,
                                                  fallback_model=fallback_model)
    pred = with_other(step_time(model, lay, work, CPU_THIS_MACHINE, eff).as_metrics())
    assumed["efficiency"] = dataclasses.asdict(eff)
    return pred, assumed, FitRun(summarize(rows), model, lay, work, CPU_THIS_MACHINE, run_dir.name)


# ----------------------------------------------------------------------------------------------
# report


def table(results: list[dict]) -> str:
    """One line per configuration: measured / predicted per phase; speedup and efficiency against
    the first (smallest) node count of the same source, layout and scaling, in work per second: with a fixed batch
    (strong scaling) speedup = t_1 / t_n; with a batch that grows with the nodes (weak scaling,
    "batch" in the rows) speedup = (batch_n / batch_1) * t_1 / t_n. Efficiency = speedup / node ratio."""
    hdr = ["nodes", "layout", "source", "scaling", "batch", "step meas", "step pred", "meas/pred", "rollout m/p",
           "hint m/p", "logprob m/p", "update m/p", "sync m/p", "other m/p", "speedup", "efficiency"]
    lines = [" | ".join(hdr)]
    first: dict[str, dict] = {}
    for r in results:
        m, p = r["measured"], r["predicted"]
        key = f"{r['source']} {r['layout']} {r.get('scaling', '')}"
        first.setdefault(key, r)
        step = m.get("time/step", math.nan)
        step0 = first[key]["measured"].get("time/step", math.nan)
        work = (r.get("batch") or 1) / (first[key].get("batch") or 1)
        speedup = work * step0 / step if step else math.nan
        eff = speedup / (r["nodes"] / first[key]["nodes"])
        ratio = step / p["time/step"] if p.get("time/step") else math.nan

        def mp(k: str) -> str:
            return f"{m.get(k, math.nan):.3g}/{p.get(k, math.nan):.3g}"

        lines.append(" | ".join([str(r["nodes"]), r["layout"], r["source"], r.get("scaling", "-"),
                                 str(r.get("batch", "-")), f"{step:.3g}",
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
        groups.setdefault(f"{r['source']} {r['layout']} {r.get('scaling', '')}".strip(), []).append(r)
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
    labels = [f"{r['nodes']}n {r['layout']}" + (f" b{r['batch']}" if r.get("batch") else "")
              + (f" {r['scaling'][0]}" if r.get("scaling") else "") for r in results]
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


def parse_scalings(s: str) -> list[str]:
    """"weak", "strong", a comma list of them, or "both" (= weak,strong)."""
    out: list[str] = []
    for x in s.replace("both", "weak,strong").split(","):
        x = x.strip()
        if not x:
            continue
        if x not in ("weak", "strong"):
            raise argparse.ArgumentTypeError(f"scaling {x!r}: expected weak, strong, a comma list of them, or both")
        if x not in out:
            out.append(x)
    if not out:
        raise argparse.ArgumentTypeError("no scaling given")
    return out


# ----------------------------------------------------------------------------------------------
# fit


def _row_ratios(run: FitRun, eff: Efficiency) -> dict[str, float]:
    """measured / predicted at `eff` for time/step and each fit row (the keys the run measured)."""
    pred = predict_metrics(run, eff)
    m = run.measured
    out = {"time/step": m["time/step"] / pred["time/step"] if m.get("time/step") and pred["time/step"] else math.nan}
    for name, keys in FIT_ROWS.items():
        ks = [k for k in keys if m.get(k) is not None]
        if ks:
            p = sum(pred[k] for k in ks)
            out[name] = sum(float(m[k]) for k in ks) / p if p else math.nan
    return out


def fit_section(results: list[dict], fit_runs: dict[str, FitRun], *, base: Efficiency,
                params: tuple[str, ...]) -> dict:
    """Fits `params` on the distinct runs (fit_runs: label -> FitRun; result rows name theirs in
    "fit_run"), adds predicted_fitted / predicted_loo_step to the rows, and returns the JSON's
    "fit" section."""
    runs = list(fit_runs.values())
    eff, report = fit_efficiency(runs, base, params=params)
    loo = leave_one_out(runs, base, params=params)
    loo_by = {e["run"]: e for e in loo}
    before, after = [], []
    for r in results:
        run = fit_runs.get(r.get("fit_run", ""))
        if run is None:
            continue
        ident = {"run": run.label, "nodes": r["nodes"], "layout": r["layout"], "scaling": r.get("scaling"),
                 "batch": r.get("batch")}
        before.append({**ident, **_row_ratios(run, base)})
        after.append({**ident, **_row_ratios(run, eff)})
        r["predicted_fitted"] = predict_metrics(run, eff)
        if "predicted_step" in loo_by.get(run.label, {}):
            r["predicted_loo_step"] = loo_by[run.label]["predicted_step"]
    return {"constants": dataclasses.asdict(eff), "base": dataclasses.asdict(base),
            "base_source": CPU_FITTED_EFFICIENCY_SOURCE if base == CPU_FITTED_EFFICIENCY else "Efficiency() defaults",
            "fitted_params": [p for p in params if report["status"][p] == "fitted"], "status": report["status"],
            "method": report["method"], "runs": [r.label for r in runs],
            "paste": efficiency_source(eff, "CPU_FITTED_EFFICIENCY" if base == CPU_FITTED_EFFICIENCY
                                       else "FITTED_EFFICIENCY"),
            "per_row_ratio_before": before, "per_row_ratio_after": after, "leave_one_out": loo,
            "rms_rel_error_before": report["rms_rel_error_before"],
            "rms_rel_error_after": report["rms_rel_error_after"], "rounds": report["rounds"],
            "converged": report["converged"], "rows": report["rows"]}


def fit_table(results: list[dict], fit: dict) -> str:
    """Per configuration: the step measured / predicted with the base constants, the fitted ones, and
    leave-one-out (fitted without this run); then measured / predicted per fit row, fitted."""
    hdr = ["nodes", "layout", "scaling", "batch", "step meas", "pred base", "m/p", "pred fit", "m/p", "pred loo",
           "m/p"] + [f"{name} m/p fit" for name in FIT_ROWS]
    lines = [" | ".join(hdr)]
    after = {(a["run"], a["scaling"]): a for a in fit["per_row_ratio_after"]}
    for r in results:
        if "predicted_fitted" not in r:
            continue
        step = r["measured"].get("time/step", math.nan)
        pb, pf = r["predicted"].get("time/step", math.nan), r["predicted_fitted"]["time/step"]
        pl = r.get("predicted_loo_step", math.nan)
        ratios = after.get((r["fit_run"], r.get("scaling")), {})
        lines.append(" | ".join([str(r["nodes"]), r["layout"], r.get("scaling", "-"), str(r.get("batch", "-")),
                                 f"{step:.3g}", f"{pb:.3g}", f"{step / pb:.2f}", f"{pf:.3g}", f"{step / pf:.2f}",
                                 f"{pl:.3g}", f"{step / pl:.2f}"]
                                + [f"{ratios.get(name, math.nan):.2f}" for name in FIT_ROWS]))
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# main


def _ray_connect(address: str | None) -> int:
    import ray

    if address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=address or os.environ["RAY_ADDRESS"], logging_level="WARNING", log_to_driver=False)
    else:  # no cluster: a local one-node Ray
        ray.init(num_cpus=max(2, os.cpu_count() or 2), logging_level="WARNING", log_to_driver=False,
                 include_dashboard=False)
    return len([n for n in ray.nodes() if n["Alive"]])


def main(argv: list[str] | None = None) -> int:
    prov = provenance(default_command() if argv is None else shlex.join(["python", "bench/scaling.py", *argv]),
                      start=run_start())
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
                    help="nodes=N,tp=T,pp=P[,scaling=S]:PATH -- summarize an existing metrics JSONL instead of running")
    ap.add_argument("--model", default=None, help="perf-model preset for predictions [tiny (stand-in) / 7b]")
    ap.add_argument("--gpus-per-node", type=int, default=8,
                    help="trainer ranks per node ({gpus_per_node} = {ranks_per_node}; on CPU too) [8]")
    ap.add_argument("--engines-per-node", type=int, default=1, help="trainer: {engines} = nodes * this [1]")
    ap.add_argument("--batch", type=int, default=None,
                    help="trainer: prompts per step for {batch} (per node with --scaling weak)")
    ap.add_argument("--scaling", type=parse_scalings, default=["strong"],
                    help="strong: same batch at every node count; weak: {batch} and the predicted "
                         "workload grow with the nodes; weak,strong (or both): both sweeps [strong]")
    ap.add_argument("--hardware", choices=["auto", "h100", "cpu"], default="auto",
                    help="prediction for trainer runs: H100 nodes (--model, --prompts ...) or this CPU "
                         "machine (model and workload from the run) [auto: cpu without CUDA]")
    ap.add_argument("--fit", action=argparse.BooleanOptionalAction, default=None,
                    help="fit the Efficiency constants to the measured rows [on for --hardware cpu trainer runs]")
    ap.add_argument("--fit-params", default=",".join(DEFAULT_FIT_PARAMS),
                    help=f"Efficiency fields to fit, in priority order [{','.join(DEFAULT_FIT_PARAMS)}]")
    ap.add_argument("--prompts", type=int, default=Workload.prompts)
    ap.add_argument("--samples", type=int, default=Workload.samples)
    ap.add_argument("--prompt-tokens", type=float, default=Workload.prompt_tokens)
    ap.add_argument("--response-tokens", type=float, default=Workload.response_tokens)
    ap.add_argument("--max-response-tokens", type=int, default=Workload.max_response_tokens)
    ap.add_argument("--ray-address", default=None)
    ap.add_argument("--timeout", type=float, default=3600, help="per trainer run, seconds")
    a = ap.parse_args(argv)

    layouts = [parse_layout(s) for s in a.layouts.split(",") if s.strip()]
    fit_params = tuple(x.strip() for x in a.fit_params.split(",") if x.strip())
    work_dir = a.json.with_suffix("")
    work_dir.mkdir(parents=True, exist_ok=True)
    results: list[dict] = []
    fit_runs: dict[str, FitRun] = {}   # one per distinct run, for --fit
    fit_base = Efficiency()
    gpu_work = Workload(prompts=a.prompts, samples=a.samples, prompt_tokens=a.prompt_tokens,
                        response_tokens=a.response_tokens, max_response_tokens=a.max_response_tokens)

    def gpu_setup(nodes: int, tp: int, pp: int, scaling: str) -> tuple[ModelSpec, Layout, Workload]:
        model = MODELS[a.model or "7b"]
        lay = Layout(nodes=nodes, devices_per_node=a.gpus_per_node, tp=tp, pp=pp,
                     rollout_tp=default_rollout_tp(model, H100_SXM))
        work = dataclasses.replace(gpu_work, prompts=gpu_work.prompts * nodes) if scaling == "weak" else gpu_work
        return model, lay, work

    def gpu_prediction(nodes: int, tp: int, pp: int, scaling: str) -> dict:
        try:
            return with_other(step_time(*gpu_setup(nodes, tp, pp, scaling), H100_SXM).as_metrics())
        except ValueError as e:
            print(f"[scaling] no prediction for nodes={nodes} tp={tp} pp={pp}: {e}", file=sys.stderr)
            return {}

    def add_gpu_fit_run(row: dict, label: str, scaling: str) -> None:
        if row["predicted"]:
            fit_runs[label] = FitRun(row["measured"], *gpu_setup(row["nodes"], row["tp"], row["pp"], scaling),
                                     H100_SXM, label)
            row["fit_run"] = label

    trainer = False
    if a.from_jsonl:
        for item in a.from_jsonl:
            spec, _, path = item.partition(":")
            kv = dict(x.split("=") for x in spec.split(","))
            n, tp, pp = int(kv["nodes"]), int(kv.get("tp", 1)), int(kv.get("pp", 1))
            scaling = kv.get("scaling", a.scaling[0])
            results.append({"nodes": n, "layout": f"tp{tp}pp{pp}", "tp": tp, "pp": pp, "source": "jsonl",
                            "scaling": scaling, "metrics_jsonl": path,
                            "measured": summarize(read_metrics(path, warmup=a.warmup)),
                            "predicted": gpu_prediction(n, tp, pp, scaling), "prediction_model": a.model or "7b"})
            if a.batch is not None:
                results[-1]["batch"] = a.batch * n if scaling == "weak" else a.batch
            add_gpu_fit_run(results[-1], f"jsonl{len(results)}-n{n}-tp{tp}pp{pp}", scaling)
    else:
        trainer = bool(a.train_cmd)
        available = _ray_connect(a.ray_address) if not a.train_cmd else int(os.environ.get("SAGE_NUM_NODES", "1"))
        nodes_list = ([int(x) for x in a.nodes.split(",")] if a.nodes
                      else [2 ** i for i in range(int(math.log2(max(1, available))) + 1)])
        stand = StandIn()
        model = MODELS[a.model or "tiny"]
        hardware = a.hardware
        if hardware == "auto":
            import torch

            hardware = "h100" if torch.cuda.is_available() else "cpu"
        if trainer and hardware == "cpu":
            fit_base = CPU_FITTED_EFFICIENCY
        scalings = a.scaling if trainer else a.scaling[:1]   # the stand-in has no batch to scale
        done: dict[tuple, dict] = {}   # (nodes, tp, pp, batch) -> the row that ran it
        for scaling in scalings:
            prefix = f"{scaling}-" if len(scalings) > 1 else ""
            for n in nodes_list:
                for tp, pp in layouts:
                    name = f"{prefix}n{n}-tp{tp}pp{pp}"
                    metrics = work_dir / f"{name}.jsonl"
                    row = {"nodes": n, "layout": f"tp{tp}pp{pp}", "tp": tp, "pp": pp, "metrics_jsonl": str(metrics)}
                    t0 = time.time()
                    if a.train_cmd:
                        batch = None if a.batch is None else (a.batch * n if scaling == "weak" else a.batch)
                        same = done.get((n, tp, pp, batch))
                        if same is not None:   # e.g. 1 node: weak and strong run the same batch
                            results.append({**same, "scaling": scaling, "reused_from": same["run_name"], "wall_s": 0.0})
                            print(f"[scaling] {name}: same configuration as {same['run_name']}, not run again",
                                  flush=True)
                            continue
                        metrics = work_dir / name / "metrics.jsonl"
                        row.update(metrics_jsonl=str(metrics), run_name=name)
                        run_trainer(template=a.train_cmd, nodes=n, tp=tp, pp=pp, gpus_per_node=a.gpus_per_node,
                                    steps=a.steps + a.warmup, metrics_path=metrics, timeout=a.timeout,
                                    engines_per_node=a.engines_per_node, batch=a.batch, scaling=scaling)
                        row.update(source="trainer", engines=n * a.engines_per_node, scaling=scaling,
                                   ranks_per_node=a.gpus_per_node)
                        if batch is not None:
                            row["batch"] = batch
                        row["measured"] = summarize(read_metrics(metrics, warmup=a.warmup))
                        if hardware == "cpu":
                            try:
                                pred, assumed, fit_run = cpu_trainer_prediction(
                                    metrics.parent, read_metrics(metrics, warmup=a.warmup),
                                    engines=n * a.engines_per_node, prompt_tokens=a.prompt_tokens,
                                    fallback_model=a.model or "tiny")
                            except ValueError as e:
                                print(f"[scaling] no prediction for {name}: {e}", file=sys.stderr)
                                row.update(predicted={}, prediction_model=None)
                            else:
                                row.update(predicted=pred, prediction_model=assumed["model"]["name"],
                                           prediction_assumed=assumed)
                                fit_runs[name] = fit_run
                                row["fit_run"] = name
                        else:
                            row.update(predicted=gpu_prediction(n, tp, pp, scaling), prediction_model=a.model or "7b")
                            add_gpu_fit_run(row, name, scaling)
                        done[(n, tp, pp, batch)] = row
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
                    print(f"[scaling] {name}: measured {row['measured'].get('time/step', math.nan):.3g} s"
                          f" / predicted {row['predicted'].get('time/step', math.nan):.3g} s", flush=True)

    if not results:
        print("no configuration ran", file=sys.stderr)
        return 1
    print(table(results))
    out = {"created": time.strftime("%Y-%m-%dT%H:%M:%S"), "host": socket.gethostname(), **prov,
           "argv": sys.argv if argv is None else ["bench/scaling.py", *argv],
           "load_avg_1m_at_end": round(os.getloadavg()[0], 2),
           "keys": list(KEYS) + [OTHER], "results": results}
    fit_on = a.fit if a.fit is not None else (trainer and fit_base is CPU_FITTED_EFFICIENCY)
    if fit_on:
        if not fit_runs:
            print("[scaling] --fit: no run with a perf-model prediction to fit (the stand-in is not fitted)",
                  file=sys.stderr)
            out["fit"] = {"error": "no run with a perf-model prediction to fit"}
        else:
            try:
                fit = fit_section(results, fit_runs, base=fit_base, params=fit_params)
            except ValueError as e:
                print(f"[scaling] --fit: {e}", file=sys.stderr)
                out["fit"] = {"error": str(e)}
            else:
                out["fit"] = fit
                print(f"\nfitted on {len(fit_runs)} run(s) ({fit['method'].split('.')[0]}; see the JSON's fit.method):")
                for p in fit_params:
                    print(f"  {p}: {fit['base'][p]:.4g} -> {fit['constants'][p]:.4g}  ({fit['status'][p]})")
                print(f"  rms relative error over the fit rows: {fit['rms_rel_error_before']:.3f} before, "
                      f"{fit['rms_rel_error_after']:.3f} after")
                print(f"  {fit['paste']}")
                print(fit_table(results, fit))
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps(out, indent=1, default=str))
    print(f"wrote {a.json}")
    if a.plot:
        plot(results, a.plot)
        print(f"wrote {a.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
