"""EC2 instances dstack stops using: terminated when idle, forgotten (jobs interrupted) when gone."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from dstack.backends.ec2_launch import abandon, terminate_instance
from dstack.backends.ec2_rows import KIND, active_jobs, claim_idle, ec2_hosts, forget_host, get_host, touch
from dstack.cloud.instance import Ec2Instance

if TYPE_CHECKING:
    from dstack.store.hosts import Host
    from dstack.store.state import State

REAPED_SETTING = "aws.reaped_at"
GONE = ("shutting-down", "terminated", "stopping", "stopped", "missing")


@dataclass
class Reaped:
    """An instance dstack stopped using: terminated when idle, or found gone (reclaimed, shut itself down)."""

    host: str
    reason: str
    jobs: list[str] = field(default_factory=list)  # jobs it interrupted


def reap_idle(state: State, *, now: float | None = None, min_interval: float = 30.0) -> list[Reaped]:
    """Terminate EC2 hosts idle past their timeout, and forget (interrupting their jobs) those that are gone.

    Cheap when there are no EC2 hosts; otherwise at most one API call per region every `min_interval`
    seconds across all dstack processes.
    """
    hosts = ec2_hosts(state)
    if not hosts:
        return []
    now = time.time() if now is None else now
    if now - float(state.setting(REAPED_SETTING) or 0) < min_interval:
        return []
    with state.transaction():  # one process of many does the round
        if now - float(state.setting(REAPED_SETTING) or 0) < min_interval:
            return []
        state.set_setting(REAPED_SETTING, repr(now))
    from dstack.cloud.aws import Clients
    from dstack.cloud.launcher import describe_instances

    records = {h.name: Ec2Instance.of(h) for h in hosts}
    reaped: list[Reaped] = []
    with Clients() as clients:
        seen: dict[str, dict[str, Any]] = {}
        for region in sorted({r.region for r in records.values() if r.region}):
            ids = [r.instance_id for r in records.values() if r.region == region and r.instance_id]
            seen.update(describe_instances(clients.ec2(region), ids, region))
        for host in hosts:
            record = records[host.name]
            if host.status == "launching":
                if now - (record.launched_at or now) > 3600:  # its launching process died
                    abandon(state, clients, host.name)
                    reaped.append(Reaped(host.name, "its launch never finished"))
                continue
            instance = seen.get(record.instance_id or "")
            status = instance["State"]["Name"] if instance else "missing"
            if status in GONE:
                reason = _gone_reason(host, instance, status)
                jobs = on_spot_interruption(state, host.name, reason)
                forget_host(state, host)
                reaped.append(Reaped(host.name, reason, jobs))
                continue
            if active_jobs(state, host.name):
                touch(state, host.name, now)
                continue
            idle = now - idle_since(host)
            if idle >= record.idle_timeout and claim_idle(state, host.name):
                terminate_instance(clients, host)
                forget_host(state, host)
                reaped.append(Reaped(host.name, f"idle for {int(idle)}s"))
    return reaped


def check_host(state: State, name: str) -> Reaped | None:
    """When an EC2 host stops answering: ask the API whether its instance is gone; if so interrupt its jobs
    (see `on_spot_interruption`) and forget it. None while the instance still runs (or it is no EC2 host)."""
    from dstack.cloud.aws import Clients
    from dstack.cloud.launcher import describe_instances

    host = get_host(state, name)
    if host is None or host.kind != KIND:
        return None
    record = Ec2Instance.of(host)
    if not record.instance_id:
        return None
    with Clients() as clients:
        ec2 = clients.ec2(record.region)
        instance = describe_instances(ec2, [record.instance_id], record.region).get(record.instance_id)
    status = instance["State"]["Name"] if instance else "missing"
    if status not in GONE:
        return None
    reason = _gone_reason(host, instance, status)
    jobs = on_spot_interruption(state, name, reason)
    forget_host(state, host)
    return Reaped(name, reason, jobs)


def idle_since(host: Host) -> float:
    """Since when the host has had no job (its last job's placement or last seen busy, else ready time)."""
    record = Ec2Instance.of(host)
    return max(host.last_used_at or 0.0, record.ready_at or record.launched_at or 0.0)


def on_spot_interruption(
    state: State, host: str, reason: str = "the spot instance was reclaimed", retry: bool = True
) -> list[str]:
    """Mark the jobs running on a host that is gone: placed again (pending) where their `retry` allows
    interruptions, failed with `interrupted: <reason>` otherwise; the ids of the jobs touched."""
    from dstack.runs import retry_or_fail

    touched = []
    for job in active_jobs(state, host):
        if retry_or_fail(state, job, f"interrupted: {reason}", "interruption", allow_retry=retry):
            touched.append(job.id)
    return touched


def _gone_reason(host: Host, instance: dict[str, Any] | None, status: str) -> str:
    reason = (instance or {}).get("StateReason") or {}
    code = str(reason.get("Code", ""))
    if "Spot" in code:
        return f"the spot instance {host.name} was reclaimed by AWS"
    if code == "Client.InstanceInitiatedShutdown":
        return f"instance {host.name} shut itself down"
    return f"instance {host.name} is {status}" + (f" ({reason['Message']})" if reason.get("Message") else "")
