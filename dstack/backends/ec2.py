"""EC2 runners: an instance rented for a job nothing else fits becomes a host of kind 'ec2' that SSHRunner
runs jobs on like any host; it is terminated when idle, and its jobs are placed again when it is reclaimed.

The host row's `cloud` JSON holds instance_id, instance_type, region, price, spot, launched_at, ready_at and
idle_timeout. `DSTACK_EC2_SSH_OVERRIDE=user@host:port` makes every launched instance be reached at that
address instead of its own: the tests' stand-in for a machine (moto launches none), never set otherwise.
"""

from __future__ import annotations

import os
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from dstack.errors import CloudError, DstackError, HostError, UsageError

if TYPE_CHECKING:
    from dstack.backends.base import Capacity
    from dstack.cloud.aws import Clients
    from dstack.cloud.config import AwsConfig
    from dstack.cloud.instance_types import InstanceType
    from dstack.specs import JobSpec
    from dstack.store.hosts import Host
    from dstack.store.state import State

KIND = "ec2"
OVERRIDE_ENV = "DSTACK_EC2_SSH_OVERRIDE"
REAPED_SETTING = "aws.reaped_at"
GONE = ("shutting-down", "terminated", "stopping", "stopped", "missing")


def configured(state: State) -> bool:
    """Whether `dstack config aws` was run (so dstack may launch instances)."""
    from dstack.cloud.config import SETTING

    return bool(state.setting(SETTING))


def ec2_hosts(state: State) -> list[Host]:
    """The hosts that are EC2 instances dstack launched."""
    from dstack.store import hosts as store

    return store.list_hosts(state.db, kind=KIND)


# --- launching ------------------------------------------------------------------------------------------


def launch_for(state: State, spec: JobSpec) -> str | None:
    """Launch the cheapest allowed instance that fits the job, wait until it is a ready host; its name.

    None when AWS is not configured or the limits forbid it (no allowed type fits under the maximum price,
    or the maximum number of instances runs); `why_not(state, spec)` says which. CloudError (one line) when
    the API refuses or the instance never answers; nothing is left running then.
    """
    from dstack.cloud.aws import Clients, home_id
    from dstack.cloud.config import load_config
    from dstack.cloud.instance_types import BY_NAME
    from dstack.cloud.launcher import live_instance_ids, offers

    cfg = load_config(state)
    if cfg is None:
        return None
    for host in ec2_hosts(state):  # one being launched already fits: the job waits for it
        itype = BY_NAME.get((host.cloud or {}).get("instance_type", ""))
        if host.status == "launching" and itype is not None and itype.fits(spec):
            return host.name
    home = home_id(state)
    with Clients() as clients:
        choices = offers(clients, cfg, spec)
        if not choices:
            return None
        known = {(h.cloud or {}).get("instance_id") for h in ec2_hosts(state)}
        orphans = len(live_instance_ids(clients, cfg.regions, home) - known)  # count against the limit too
        name = _reserve(state, cfg, choices[0].itype, choices[0].region, orphans)
        if name is None:
            return None
        try:
            _launch(state, clients, cfg, choices, name, home)
        except BaseException:
            _abandon(state, clients, name)
            raise
    return name


def why_not(state: State, spec: JobSpec) -> str:
    """Why `launch_for` would launch nothing for the job (one line, for the job's reason)."""
    from dstack.cloud.config import load_config
    from dstack.cloud.launcher import refusal

    cfg = load_config(state)
    if cfg is None:
        return "AWS is not configured (`dstack config aws`)"
    if len(ec2_hosts(state)) >= cfg.max_instances:
        return f"the maximum of {cfg.max_instances} instances runs already"
    return refusal(cfg, spec)


def _reserve(state: State, cfg: AwsConfig, itype: InstanceType, region: str, orphans: int = 0) -> str | None:
    """Add the host row (status 'launching') unless `max_instances` are there; in one transaction."""
    from dstack.store import hosts as store
    from dstack.store.hosts import Host

    name = f"ec2-{uuid.uuid4().hex[:8]}"
    now = time.time()
    cloud = {
        "instance_id": None,
        "instance_type": itype.name,
        "region": region,
        "price": None,
        "spot": None,
        "launched_at": now,
        "ready_at": None,
        "idle_timeout": cfg.idle_timeout,
    }
    with state.transaction() as db:
        if len(store.list_hosts(db, kind=KIND)) + orphans >= cfg.max_instances:
            return None
        store.insert_host(db, Host(name=name, kind=KIND, status="launching", cloud=cloud, created_at=now))
    return name


def _launch(state: State, clients: Clients, cfg: AwsConfig, choices: list[Any], name: str, home: str) -> None:
    from dstack.cloud import launcher
    from dstack.home import sub

    deadline = time.time() + cfg.launch_timeout
    offer, instance, key_file = launcher.launch(
        clients, cfg, choices, home=home, host=name, key_dir=sub("aws")
    )
    host = _host(state, name)
    host.cloud = {
        **(host.cloud or {}),
        "instance_id": instance["InstanceId"],
        "instance_type": offer.itype.name,
        "region": offer.region,
        "price": offer.price,
        "spot": offer.spot,
    }
    host.identity_file = key_file
    _save(state, host)
    ec2 = clients.ec2(offer.region)
    instance = launcher.wait_running(ec2, instance["InstanceId"], offer.region, deadline)
    host.user, host.hostname, host.port = _ssh_address(cfg, instance)
    host.cloud["address"] = launcher.address_of(instance)
    _save(state, host)
    launcher.wait_ssh(host.hostname, host.port, deadline)
    capacity, host_key = _prepare(state, host, offer.itype, deadline)
    host.capacity, host.host_key, host.status = capacity, host_key, "ready"
    host.probed_at = host.cloud["ready_at"] = time.time()
    _save(state, host)


def _ssh_address(cfg: AwsConfig, instance: dict[str, Any]) -> tuple[str, str, int]:
    """user, hostname and port to reach the instance (the test stand-in's when OVERRIDE_ENV is set)."""
    from dstack.cloud.launcher import address_of
    from dstack.ssh.config import parse_address

    override = os.environ.get(OVERRIDE_ENV)
    if override:
        user, hostname, port = parse_address(override)
        return user or cfg.ssh_user, hostname, port or 22
    return cfg.ssh_user, str(address_of(instance)), 22


def _prepare(state: State, host: Host, itype: InstanceType, deadline: float) -> tuple[Capacity, str | None]:
    """Log in (a fresh instance's host key is trusted and pinned on first sight), probe it, and check Docker
    and the NVIDIA runtime where the type has GPUs; the host's capacity and key."""
    from dstack.hosts import probe, target_of
    from dstack.ssh.connection import get_connection, unpin_key

    target = target_of(host)
    if not _shares_address(state, host):
        unpin_key(target)  # an earlier instance at this address (IPs are reused) had another key
    while True:
        try:
            conn = get_connection(target, name=host.name, accept=lambda fp: True)
            break
        except HostError as exc:  # cloud-init may not have installed the key yet
            if time.time() > deadline:
                raise CloudError(f"could not log in to {host.name}: {exc}") from exc
            time.sleep(3)
    found = probe(conn)
    stand_in = bool(os.environ.get(OVERRIDE_ENV))
    if itype.gpu_count and not stand_in:
        gpus = conn.run("nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true", timeout=60).stdout.strip()
        if not gpus.isdigit() or int(gpus) < itype.gpu_count:
            raise CloudError(
                f"{host.name} ({itype.name}) shows {gpus or 0} of its {itype.gpu_count} GPUs",
                hint="the AMI needs the NVIDIA driver: use a deep-learning AMI (--ami-name)",
            )
        runtimes = conn.run("docker info --format '{{json .Runtimes}}' 2>/dev/null || true", timeout=60)
        if "nvidia" not in runtimes.stdout:
            raise CloudError(
                f"{host.name} ({itype.name}) has no NVIDIA container runtime for Docker",
                hint="use a deep-learning AMI (--ami-name) or one with nvidia-container-toolkit",
            )
    capacity = itype.capacity(docker=found.docker)
    if found.gpus and not stand_in:
        capacity.gpus = found.gpus
    capacity.disk_free_mib, capacity.os = found.disk_free_mib, found.os
    capacity.python, capacity.rsync = found.python, found.rsync
    return capacity, conn.host_key


def _abandon(state: State, clients: Clients, name: str) -> None:
    """A launch failed: terminate what it started and forget the host."""
    from dstack.cloud.launcher import terminate_instances

    host = _get(state, name)
    if host is None:
        return
    cloud = host.cloud or {}
    try:
        if cloud.get("instance_id"):
            terminate_instances(clients.ec2(cloud["region"]), [cloud["instance_id"]], cloud["region"])
    finally:
        forget_host(state, host)


# --- idle teardown, interruptions, removal --------------------------------------------------------------


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

    reaped: list[Reaped] = []
    with Clients() as clients:
        seen: dict[str, dict[str, Any]] = {}
        for region in sorted(
            {str((h.cloud or {}).get("region")) for h in hosts if (h.cloud or {}).get("region")}
        ):
            ids = [
                h.cloud["instance_id"]
                for h in hosts
                if h.cloud and h.cloud.get("region") == region and h.cloud.get("instance_id")
            ]
            seen.update(describe_instances(clients.ec2(region), ids, region))
        for host in hosts:
            cloud = host.cloud or {}
            if host.status == "launching":
                if now - float(cloud.get("launched_at") or now) > 3600:  # its launching process died
                    _abandon(state, clients, host.name)
                    reaped.append(Reaped(host.name, "its launch never finished"))
                continue
            instance = seen.get(cloud.get("instance_id") or "")
            status = instance["State"]["Name"] if instance else "missing"
            if status in GONE:
                reason = _gone_reason(host, instance, status)
                jobs = on_spot_interruption(state, host.name, reason)
                forget_host(state, host)
                reaped.append(Reaped(host.name, reason, jobs))
                continue
            if _active_jobs(state, host.name):
                _touch(state, host.name, now)
                continue
            idle = now - idle_since(host)
            if idle >= float(cloud.get("idle_timeout", 900)) and _claim_idle(state, host.name):
                _terminate_instance(clients, host)
                forget_host(state, host)
                reaped.append(Reaped(host.name, f"idle for {int(idle)}s"))
    return reaped


def check_host(state: State, name: str) -> Reaped | None:
    """When an EC2 host stops answering: ask the API whether its instance is gone; if so interrupt its jobs
    (see `on_spot_interruption`) and forget it. None while the instance still runs (or it is no EC2 host)."""
    from dstack.cloud.aws import Clients
    from dstack.cloud.launcher import describe_instances

    host = _get(state, name)
    cloud = (host.cloud or {}) if host is not None else {}
    if host is None or host.kind != KIND or not cloud.get("instance_id"):
        return None
    with Clients() as clients:
        region = cloud["region"]
        instance = describe_instances(clients.ec2(region), [cloud["instance_id"]], region).get(
            cloud["instance_id"]
        )
    status = instance["State"]["Name"] if instance else "missing"
    if status not in GONE:
        return None
    reason = _gone_reason(host, instance, status)
    jobs = on_spot_interruption(state, name, reason)
    forget_host(state, host)
    return Reaped(name, reason, jobs)


def idle_since(host: Host) -> float:
    """Since when the host has had no job (its last job's placement or last seen busy, else ready time)."""
    cloud = host.cloud or {}
    return max(host.last_used_at or 0.0, float(cloud.get("ready_at") or cloud.get("launched_at") or 0.0))


def on_spot_interruption(
    state: State, host: str, reason: str = "the spot instance was reclaimed", retry: bool = True
) -> list[str]:
    """Mark the jobs running on a host that is gone: placed again (pending) where their `retry` allows
    interruptions, failed with `interrupted: <reason>` otherwise; the ids of the jobs touched."""
    from dstack.runs import retry_or_fail

    touched = []
    for job in _active_jobs(state, host):
        if retry_or_fail(state, job, f"interrupted: {reason}", "interruption", allow_retry=retry):
            touched.append(job.id)
    return touched


def terminate(state: State, name: str, force: bool = False) -> Host:
    """`dstack hosts remove NAME` of an EC2 host: terminate the instance now and forget the host.

    Refused while jobs run there unless `force` (they fail then)."""
    from dstack.cloud.aws import Clients

    host = _get(state, name)
    if host is None or host.kind != KIND:
        raise UsageError(f"{name} is not an EC2 host dstack launched") if host else _not_found(state, name)
    jobs = _active_jobs(state, name)
    if jobs and not force:
        raise UsageError(
            f"{name} runs {len(jobs)} job(s) ({', '.join(j.workflow for j in jobs[:3])})",
            hint="stop them first, or pass --force to terminate it anyway",
        )
    on_spot_interruption(state, name, f"host {name} was terminated", retry=False)
    with Clients() as clients:
        _terminate_instance(clients, host)
    forget_host(state, host)
    return host


def describe(state: State, host: Host, now: float | None = None) -> dict[str, Any]:
    """What `dstack hosts` shows of an EC2 host: type, price, spot or not, region, instance, idle seconds."""
    cloud = host.cloud or {}
    now = time.time() if now is None else now
    busy = bool(_active_jobs(state, host.name))
    return {
        "instance_type": cloud.get("instance_type"),
        "price": cloud.get("price"),
        "spot": cloud.get("spot"),
        "region": cloud.get("region"),
        "instance_id": cloud.get("instance_id"),
        "idle_s": None if busy or host.status != "ready" else max(0, int(now - idle_since(host))),
        "idle_timeout": cloud.get("idle_timeout"),
    }


# --- rows -----------------------------------------------------------------------------------------------


def _get(state: State, name: str) -> Host | None:
    from dstack.store import hosts as store

    return store.get_host(state.db, name)


def _host(state: State, name: str) -> Host:
    host = _get(state, name)
    if host is None:
        raise CloudError(f"host {name} was removed while it was being launched")
    return host


def _not_found(state: State, name: str) -> DstackError:
    from dstack.hosts import get

    try:
        get(state.db, name)
    except DstackError as exc:
        return exc
    return UsageError(f"{name} is not an EC2 host dstack launched")


def _save(state: State, host: Host) -> None:
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
    if host.hostname and not _shares_address(state, host):
        from dstack.hosts import target_of
        from dstack.ssh.connection import unpin_key

        unpin_key(target_of(host))


def _shares_address(state: State, host: Host) -> bool:
    """Whether another host row is reached at the same address (then its pinned key stays)."""
    from dstack.store import hosts as store

    if not host.hostname:
        return False
    return any(h.name != host.name for h in store.hosts_at(state.db, host.hostname, host.port or 22))


def _touch(state: State, name: str, now: float) -> None:
    from dstack.store import hosts as store

    store.touch_host(state.db, name, now)


def _active_jobs(state: State, runner: str) -> list[Any]:
    return [j for j in state.jobs(statuses=("starting", "running")) if j.runner == runner]


def _claim_idle(state: State, name: str) -> bool:
    """Take an idle host out of placement (status 'terminating') unless a job was placed on it meanwhile."""
    from dstack.store import hosts as store

    with state.transaction() as db:
        host = store.get_host(db, name)
        if host is None or state.reservations(name) or _active_jobs(state, name):
            return False
        host.status = "terminating"
        store.delete_host(db, name)
        store.insert_host(db, host)
    return True


def _terminate_instance(clients: Clients, host: Host) -> None:
    from dstack.cloud.launcher import terminate_instances

    cloud = host.cloud or {}
    if cloud.get("instance_id"):
        terminate_instances(clients.ec2(cloud["region"]), [cloud["instance_id"]], cloud["region"])


def _gone_reason(host: Host, instance: dict[str, Any] | None, status: str) -> str:
    reason = (instance or {}).get("StateReason") or {}
    code = str(reason.get("Code", ""))
    if "Spot" in code:
        return f"the spot instance {host.name} was reclaimed by AWS"
    if code == "Client.InstanceInitiatedShutdown":
        return f"instance {host.name} shut itself down"
    return f"instance {host.name} is {status}" + (f" ({reason['Message']})" if reason.get("Message") else "")


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
