"""Fixtures of the launch tests: a real one-host Slurm cluster (session), the tiny RM stage's
command, and running ``moslim launch slurm`` against the cluster."""

import pytest

from launch_helpers import SlurmCluster, missing_reason  # noqa: F401  (re-exported for the fixture)


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    """munged + slurmctld + slurmd on localhost (CPUs=2); stopped, and checked gone, at the end."""
    reason = missing_reason()
    if reason:
        pytest.skip(reason)
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


