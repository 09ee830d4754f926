"""The one-ledger placement plan (sage_megatron/cluster.py) and the env every rank actor gets."""
from __future__ import annotations

import pytest

from sage_megatron.cluster import LayoutDoesNotFit, plan_cluster
from sage_megatron.rank_actors import rank_env


def cpu_nodes(n: int, cpus: int = 2) -> list[dict]:
    return [{"ip": f"10.0.0.{i + 1}", "hostname": f"n{i + 1}", "cpus": cpus, "gpus": 0} for i in range(n)]


def gpu_nodes(n: int, gpus: int = 8) -> list[dict]:
    return [{"ip": f"10.0.1.{i + 1}", "hostname": f"g{i + 1}", "cpus": 64, "gpus": gpus} for i in range(n)]


def test_one_rank_per_node_puts_rank_r_on_node_r():
    plan = plan_cluster(world_size=2, nodes=cpu_nodes(2), device="cpu", ranks_per_node=1, num_engines=2)
    assert plan.rank_nodes == [0, 1] and [plan.local_rank(r) for r in (0, 1)] == [0, 0]
    assert sorted(plan.engine_nodes) == [0, 1]          # one engine in each node's remaining slot
    assert plan.rank_bundles() == [{"CPU": 1.0, "node:10.0.0.1": 0.001}, {"CPU": 1.0, "node:10.0.0.2": 0.001}]


def test_cpu_default_keeps_every_rank_on_the_first_node_and_engines_go_where_no_rank_is():
    plan = plan_cluster(world_size=4, nodes=cpu_nodes(2, cpus=8), device="cpu", num_engines=2)
    assert plan.rank_nodes == [0, 0, 0, 0] and [plan.local_rank(r) for r in range(4)] == [0, 1, 2, 3]
    assert plan.engine_nodes == [1, 0]                  # disaggregated first, then round-robin
    assert plan.engine_ips() == ["10.0.0.2", "10.0.0.1"]


def test_tp_groups_stay_inside_a_node_and_pp_crosses_nodes():
    # Megatron's rank order is tp fastest: ranks (0,1) are pipeline stage 0's TP group, (2,3) stage 1's.
    plan = plan_cluster(world_size=4, nodes=cpu_nodes(2, cpus=4), device="cpu", ranks_per_node=2, num_engines=1)
    assert plan.rank_nodes == [0, 0, 1, 1]
    assert [plan.local_rank(r) for r in range(4)] == [0, 1, 0, 1]


def test_gpu_default_is_the_node_gpu_count_and_engines_never_share_a_trainer_gpu():
    plan = plan_cluster(world_size=8, nodes=gpu_nodes(2), device="cuda", num_engines=4, engine_tp=2)
    assert plan.rank_nodes == [0] * 8
    assert plan.engine_nodes == [1, 1, 1, 1]            # node 0's 8 GPUs are the trainer's
    assert plan.rank_bundle == {"GPU": 1.0, "CPU": 1.0} and plan.engine_tp == 2
    with pytest.raises(LayoutDoesNotFit, match=r"need GPU 18, the cluster has 16"):
        plan_cluster(world_size=8, nodes=gpu_nodes(2), device="cuda", num_engines=5, engine_tp=2)


def test_too_few_nodes_is_refused_with_the_numbers():
    with pytest.raises(LayoutDoesNotFit, match=r"4 trainer ranks at cluster.ranks_per_node=1 need 4 nodes, "
                                               r"the Ray cluster has 2 \(n1, n2\)"):
        plan_cluster(world_size=4, nodes=cpu_nodes(2), device="cpu", ranks_per_node=1)


def test_cpu_slots_over_budget_are_refused_per_node():
    with pytest.raises(LayoutDoesNotFit) as err:
        plan_cluster(world_size=4, nodes=cpu_nodes(2), device="cpu", ranks_per_node=2, num_engines=1)
    msg = str(err.value)
    assert "need CPU 5, the cluster has 4" in msg
    assert "n1: 2 rank(s) take CPU 2 of 2" in msg and "n2: 2 rank(s) take CPU 2 of 2" in msg
    assert "\n" not in msg


def test_rank_env_points_every_rank_at_rank_zero():
    plan = plan_cluster(world_size=2, nodes=cpu_nodes(2), device="cpu", ranks_per_node=1, num_engines=1)
    master = {"ip": "10.0.0.1", "port": 29555}
    env = rank_env(plan, 1, master=master, node_ip="10.0.0.2")
    assert {k: env[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")} == {
        "RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29555"}
    one = plan_cluster(world_size=2, nodes=cpu_nodes(1, cpus=4), device="cpu", num_engines=1)
    env = rank_env(one, 1, master=master, node_ip="10.0.0.1")
    assert env["MASTER_ADDR"] == "127.0.0.1" and env["LOCAL_RANK"] == "1"
