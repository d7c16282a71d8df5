"""The host rows of EC2 instances dstack launched: reading, saving, forgetting them; their busy jobs."""

from __future__ import annotations

from typing import TYPE_CHECKING

from dstack.errors import CloudError

if TYPE_CHECKING:
    from dstack.store.hosts import Host
    from dstack.store.state import Job, State

KIND = "ec2"


def ec2_hosts(state: State) -> list[Host]:
    """The hosts that are EC2 instances dstack launched."""
    from dstack.store import hosts as store

    return store.list_hosts(state.db, kind=KIND)


def get_host(state: State, name: str) -> Host | None:
    from dstack.store import hosts as store

    return store.get_host(state.db, name)


def launching_host(state: State, name: str) -> Host:
    """The row of a host being launched (CloudError if it was removed meanwhile)."""
    host = get_host(state, name)
    if host is None:
        raise CloudError(f"host {name} was removed while it was being launched")
    return host


def save(state: State, host: Host) -> None:
    """Write the whole row back (in one transaction; a host removed meanwhile stays removed)."""
    from dstack.store import hosts as store

    with state.transaction() as db:
        if store.get_host(db, host.name) is None:
            raise CloudError(f"host {host.name} was removed while it was being launched")
        store.delete_host(db, host.name)
        store.insert_host(db, host)


def forget_host(state: State, host: Host) -> None:
    """Delete the host row and unpin its key (unless another host shares the address)."""
    from dstack.store import hosts as store

    with state.transaction() as db:
        store.delete_host(db, host.name)
    if host.hostname and not shares_address(state, host):
        from dstack.hosts import target_of
        from dstack.ssh.connection import unpin_key

        unpin_key(target_of(host))


def shares_address(state: State, host: Host) -> bool:
    """Whether another host row is reached at the same address (then its pinned key stays)."""
    from dstack.store import hosts as store

    if not host.hostname:
        return False
    return any(h.name != host.name for h in store.hosts_at(state.db, host.hostname, host.port or 22))


def touch(state: State, name: str, now: float) -> None:
    from dstack.store import hosts as store

    store.touch_host(state.db, name, now)


def active_jobs(state: State, runner: str) -> list[Job]:
    return [j for j in state.jobs(statuses=("starting", "running")) if j.runner == runner]


def claim_idle(state: State, name: str) -> bool:
    """Take an idle host out of placement (status 'terminating') unless a job was placed on it meanwhile."""
    from dstack.store import hosts as store

    with state.transaction() as db:
        host = store.get_host(db, name)
        if host is None or state.reservations(name) or active_jobs(state, name):
            return False
        host.status = "terminating"
        store.delete_host(db, name)
        store.insert_host(db, host)
    return True
