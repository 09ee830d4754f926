"""Command line of the performance model: prints the predicted-step-time table (markdown), one
layout's phase times, or the comparison with published figures.

    python -m sage_megatron.perf.cli                  # the table in docs/perf_model.md
    python -m sage_megatron.perf.cli --compare        # the comparison with published figures
    python -m sage_megatron.perf.cli --model 32b --nodes 4 --tp 8 --pp 1
"""

from __future__ import annotations

import argparse

from sage_megatron.perf.catalogue import H100_SXM, MODELS
from sage_megatron.perf.formulas import (
    Layout, Workload, compare_published, default_rollout_tp, predict_table, step_time,
)


def _markdown(rows: list[dict]) -> str:
    cols = ["model", "nodes", "gpus", "layout", "time/rollout", "time/logprob", "time/update",
            "time/weight_sync", "time/step", "mfu_update", "train_mem_gb", "tok_per_s_per_gpu"]
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        out.append("| " + " | ".join(str(r.get(c, "")) for c in cols) + " |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Predicted hinted-GRPO step times on H100 nodes.")
    ap.add_argument("--model", choices=sorted(MODELS), action="append")
    ap.add_argument("--nodes", type=int, action="append")
    ap.add_argument("--tp", type=int)
    ap.add_argument("--pp", type=int)
    ap.add_argument("--rollout-tp", type=int)
    ap.add_argument("--response-tokens", type=float, default=Workload.response_tokens)
    ap.add_argument("--prompts", type=int, default=Workload.prompts)
    ap.add_argument("--compare", action="store_true", help="print the comparison with published figures")
    a = ap.parse_args(argv)
    if a.compare:
        print("| source | figure | published | predicted | predicted / published |\n|---|---|---|---|---|")
        for r in compare_published():
            print(f"| {r['source']} | {r['what']} | {r['published']:g} {r['unit']} | "
                  f"{r['predicted']:.3g} {r['unit']} | {r['predicted'] / r['published']:.2f} |")
        return 0
    work = Workload(prompts=a.prompts, response_tokens=a.response_tokens)
    models = a.model or ["7b", "32b", "70b"]
    nodes = a.nodes or [1, 2, 4, 8, 16]
    if a.tp or a.pp:
        for key in models:
            m = MODELS[key]
            for n in nodes:
                lay = Layout(nodes=n, tp=a.tp or 1, pp=a.pp or 1,
                             rollout_tp=a.rollout_tp or default_rollout_tp(m, H100_SXM))
                p = step_time(m, lay, work)
                print(m.name, n, "nodes", {k: round(v, 2) for k, v in p.as_metrics().items()},
                      f"mfu={p.mfu:.3f} mem={p.train_memory_gb:.1f}GB")
        return 0
    print(_markdown(predict_table(models, nodes, work)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
