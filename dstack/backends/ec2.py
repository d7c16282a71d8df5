"""EC2 runners: an instance rented for a job nothing else fits becomes a host of kind 'ec2' that SSHRunner
runs jobs on like any host; it is terminated when idle, and its jobs are placed again when it is reclaimed.

The host row's `cloud` JSON is an `Ec2Instance` (dstack.cloud.instance). Launching is in `ec2_launch`,
idle teardown and interruptions in `ec2_reap`, the rows in `ec2_rows`; this module is what the rest of
dstack calls: the capacity source, `dstack hosts` (describe) and `dstack hosts remove` (terminate).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from dstack.backends.ec2_launch import OVERRIDE_ENV, launch_for, terminate_instance, why_not
from dstack.backends.ec2_reap import (
    GONE,
    REAPED_SETTING,
    Reaped,
    check_host,
    idle_since,
    on_spot_interruption,
    reap_idle,
)
from dstack.backends.ec2_rows import KIND, active_jobs, ec2_hosts, forget_host, get_host
from dstack.cloud.instance import Ec2Instance
from dstack.errors import DstackError, UsageError

if TYPE_CHECKING:
    from dstack.specs import JobSpec
    from dstack.store.hosts import Host
    from dstack.store.state import State

__all__ = [
    "GONE",
    "KIND",
    "OVERRIDE_ENV",
    "REAPED_SETTING",
    "EC2Capacity",
    "Reaped",
    "check_host",
    "configured",
    "describe",
    "ec2_hosts",
    "forget_host",
    "idle_since",
    "launch_for",
    "on_spot_interruption",
    "reap_idle",
    "terminate",
    "why_not",
]


def configured(state: State) -> bool:
    """Whether `dstack config aws` was run (so dstack may launch instances)."""
    from dstack.cloud.config import SETTING

    return bool(state.setting(SETTING))


def terminate(state: State, name: str, force: bool = False) -> Host:
    """`dstack hosts remove NAME` of an EC2 host: terminate the instance now and forget the host.

    Refused while jobs run there unless `force` (they fail then)."""
    from dstack.cloud.aws import Clients

    host = get_host(state, name)
    if host is None or host.kind != KIND:
        raise UsageError(f"{name} is not an EC2 host dstack launched") if host else _not_found(state, name)
    jobs = active_jobs(state, name)
    if jobs and not force:
        raise UsageError(
            f"{name} runs {len(jobs)} job(s) ({', '.join(j.workflow for j in jobs[:3])})",
            hint="stop them first, or pass --force to terminate it anyway",
        )
    on_spot_interruption(state, name, f"host {name} was terminated", retry=False)
    with Clients() as clients:
        terminate_instance(clients, host)
    forget_host(state, host)
    return host


def describe(state: State, host: Host, now: float | None = None) -> dict[str, Any]:
    """What `dstack hosts` shows of an EC2 host: type, price, spot or not, region, instance, idle seconds."""
    record = Ec2Instance.of(host)
    now = time.time() if now is None else now
    busy = bool(active_jobs(state, host.name))
    return {
        "instance_type": record.instance_type or None,
        "price": record.price,
        "spot": record.spot,
        "region": record.region or None,
        "instance_id": record.instance_id,
        "idle_s": None if busy or host.status != "ready" else max(0, int(now - idle_since(host))),
        "idle_timeout": record.idle_timeout,
    }


def _not_found(state: State, name: str) -> DstackError:
    from dstack.hosts import get

    try:
        get(state.db, name)
    except DstackError as exc:
        return exc
    return UsageError(f"{name} is not an EC2 host dstack launched")


class EC2Capacity:
    """EC2 as a capacity source (`dstack.capacity.CapacitySource`) over this module's functions."""

    kind = KIND

    def configured(self, state: State) -> bool:
        return configured(state)

    def launch(self, state: State, spec: JobSpec) -> str | None:
        return launch_for(state, spec)

    def why_not(self, state: State, spec: JobSpec) -> str:
        return why_not(state, spec)

    def reap_idle(self, state: State) -> None:
        reap_idle(state)

    def check_host(self, state: State, name: str) -> bool:
        return check_host(state, name) is not None
