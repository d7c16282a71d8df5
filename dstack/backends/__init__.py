"""The runners: where a job runs (see `base.Runner`); `open_runner` makes one by its name."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dstack.backends.base import Runner
    from dstack.store.state import State


def open_runner(state: State, name: str) -> Runner:
    """A runner object for a runner name."""
    if name == "local":
        from dstack.backends.local import LocalRunner

        return LocalRunner()
    if "+" in name:  # a multi-node job's hosts (dstack.backends.gang)
        from dstack.backends.gang import GangRunner

        return GangRunner.for_runner(state, name)
    from dstack.store.hosts import get_host

    host = get_host(state.db, name)
    if host is not None and host.kind == "slurm":
        from dstack.backends.slurm import SlurmRunner

        return SlurmRunner.for_host(host)
    from dstack.backends.ssh import SSHRunner  # type: ignore[import-not-found,unused-ignore]

    return SSHRunner.for_runner(state, name)  # type: ignore[no-any-return,unused-ignore]
