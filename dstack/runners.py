"""The runners jobs can be placed on: this machine (`local`) and registered hosts."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dstack.backends.base import Capacity, Runner
    from dstack.store.state import State


@dataclass
class Slot:
    """A runner that may take jobs, with what it has in total."""

    name: str
    capacity: Capacity


def local_enabled(state: State) -> bool:
    return state.setting("local.enabled") != "0"


def available_slots(state: State, local_capacity: Capacity | None) -> list[Slot]:
    """Enabled runners that answered at their last check."""
    from dstack.backends.base import Capacity

    slots = []
    if local_enabled(state) and local_capacity is not None:
        slots.append(Slot("local", local_capacity))
    for row in state.db.execute(
        "SELECT name, capacity FROM hosts WHERE kind != 'local' AND enabled = 1 AND status = 'ready' "
        "AND capacity IS NOT NULL"
    ):
        slots.append(Slot(row["name"], Capacity.from_json(json.loads(row["capacity"]))))
    return slots


def open_runner(state: State, name: str) -> Runner:
    """A runner object for a runner name."""
    if name == "local":
        from dstack.backends.local import LocalRunner

        return LocalRunner()
    from dstack.store.hosts import get_host

    host = get_host(state.db, name)
    if host is not None and host.kind == "slurm":
        from dstack.backends.slurm import SlurmRunner

        return SlurmRunner.for_host(host)
    from dstack.backends.ssh import SSHRunner  # type: ignore[import-not-found,unused-ignore]

    return SSHRunner.for_runner(state, name)  # type: ignore[no-any-return,unused-ignore]
