"""Fixtures for the Slurm launch tests: one real local Slurm cluster (two emulated nodes) per module."""

from __future__ import annotations

import os

import pytest

from sage_megatron.testing.slurm_cluster import ClusterSpec, SlurmCluster, leftovers, unavailable_reason


def skip_or_fail_in_ci(reason: str) -> None:
    """Where `make test` installed Slurm (CI), a missing cluster is a failure, never a quiet skip."""
    if os.environ.get("CI"):
        pytest.fail(f"the Slurm tests cannot run in CI: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def slurm_cluster():
    """A live two-node cluster, torn down when the module ends (also after failures); the teardown
    fails if any process, namespace, link, /etc/hosts line or temp dir of the cluster remains."""
    reason = unavailable_reason()
    if reason:
        skip_or_fail_in_ci(reason)
    cluster = SlurmCluster(ClusterSpec(num_nodes=2))
    cluster.up()
    try:
        yield cluster
    finally:
        inodes = set(cluster.netns_inodes)
        cluster.down()
    left = leftovers(netns_inodes=inodes)
    assert not any(left.values()), f"the cluster left things behind: {left}"
