"""Slurm clusters as runners, against a real cluster (tests/slurm.py): adding one, running jobs through
sbatch, stopping them with scancel, Slurm's own end reasons."""

from __future__ import annotations

from slurm import SlurmCluster


def test_fixture_nodes_are_separate_hosts(slurm_cluster: SlurmCluster) -> None:
    out = slurm_cluster.run("srun", "-N2", "--ntasks-per-node=1", "hostname", timeout=30)
    assert sorted(out.split()) == list(slurm_cluster.nodes)
