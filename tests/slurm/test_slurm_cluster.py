"""The local Slurm cluster harness itself: up, two idle nodes that are separate hosts, clean teardown,
and recovery from a crashed run."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time

import pytest

from conftest import skip_or_fail_in_ci
from sage_megatron.testing.slurm_cluster import (ClusterBusyError, ClusterSpec, SlurmCluster, leftovers,
                                                 unavailable_reason)


pytestmark = pytest.mark.slurm


@pytest.fixture(autouse=True)
def _slurm_available():
    reason = unavailable_reason()
    if reason:
        skip_or_fail_in_ci(reason)


def assert_nothing_left(netns_inodes: set[int]) -> None:
    left = leftovers(netns_inodes=netns_inodes)
    assert left == {"processes": [], "netns": [], "links": [], "hosts_lines": [], "tmp_dirs": []}, left
    # No Slurm / munge / Ray process of ours by name either (ours = naming one of our temp dirs).
    ps = subprocess.run(["ps", "-eo", "pid=,args="], capture_output=True, text=True).stdout
    ours = [ln for ln in ps.splitlines()
            if "sgslurm-" in ln and any(d in ln for d in ("slurmd", "slurmctld", "munged", "raylet", "gcs_server", "ray "))]
    assert ours == []


def test_up_two_idle_nodes_then_clean_teardown():
    cluster = SlurmCluster(ClusterSpec(num_nodes=2))
    t0 = time.monotonic()
    cluster.up()
    try:
        up_s = time.monotonic() - t0
        assert cluster.sinfo() == {"sgnode1": "idle", "sgnode2": "idle"}, cluster.sinfo()
        out = subprocess.run(["sinfo", "-h", "-o", "%D %t"], capture_output=True, text=True,
                             env=cluster.env, check=True).stdout.split()
        assert out == ["2", "idle"]
        # Each node is its own host: own hostname, own private address, the same as /etc/hosts says.
        p = subprocess.run(["srun", "-N2", "--ntasks-per-node=1", "-l", "bash", "-c",
                            'echo "$(hostname) $(hostname --ip-address) $(hostname -I)"'],
                           capture_output=True, text=True, env=cluster.env, timeout=60)
        assert p.returncode == 0, p.stderr
        rows = sorted(ln.split(":", 1)[1].split() for ln in p.stdout.strip().splitlines())
        assert rows == [["sgnode1", cluster.node_addrs[0], cluster.node_addrs[0]],
                        ["sgnode2", cluster.node_addrs[1], cluster.node_addrs[1]]]
        assert up_s < 30, f"cluster took {up_s:.1f} s to come up"
    finally:
        inodes = set(cluster.netns_inodes)
        cluster.down()
    assert len(inodes) == 2
    assert_nothing_left(inodes)


CRASHER = textwrap.dedent("""
    import os, sys, time
    from sage_megatron.testing.slurm_cluster import SlurmCluster
    c = SlurmCluster().up()
    print(c.dir, flush=True)
    if sys.argv[1] == "crash":
        os.kill(os.getpid(), 9)      # dies without teardown: everything is left behind
    time.sleep(600)                  # "alive": holds the cluster
""")


def test_busy_while_owner_alive_then_stale_leftovers_cleaned():
    owner = subprocess.Popen([sys.executable, "-c", CRASHER, "hold"], stdout=subprocess.PIPE, text=True)
    inodes: set[int] = set()
    try:
        first_dir = owner.stdout.readline().strip()
        assert first_dir.startswith("/tmp/sgslurm-"), first_dir
        with pytest.raises(ClusterBusyError, match=str(owner.pid)):
            SlurmCluster().up()
        owner.kill()  # the owner crashes: daemons, namespaces, hosts lines and temp dir stay behind
        owner.wait()
        assert leftovers()["netns"], "the crashed owner should have left its namespaces"
        cluster = SlurmCluster().up()  # cleans the crashed run's leftovers first
        try:
            inodes = set(cluster.netns_inodes)
            assert str(cluster.dir) != first_dir
            assert cluster.sinfo() == {"sgnode1": "idle", "sgnode2": "idle"}
            import os
            assert not os.path.exists(first_dir)
        finally:
            cluster.down()
    finally:
        if owner.poll() is None:
            owner.kill()
            owner.wait()
    assert_nothing_left(inodes)
