"""Launching an EC2 instance for a job nothing else fits, until it is a ready host that SSHRunner runs on.

`DSTACK_EC2_SSH_OVERRIDE=user@host:port` makes every launched instance be reached at that address instead of
its own: the tests' stand-in for a machine (moto launches none), never set otherwise.
"""

from __future__ import annotations

import os
import time
import uuid
from typing import TYPE_CHECKING, Any

from dstack.backends.ec2_rows import (
    KIND,
    ec2_hosts,
    forget_host,
    get_host,
    launching_host,
    save,
    shares_address,
)
from dstack.cloud.instance import Ec2Instance
from dstack.errors import CloudError, HostError

if TYPE_CHECKING:
    from dstack.backends.base import Capacity
    from dstack.cloud.aws import Clients
    from dstack.cloud.config import AwsConfig
    from dstack.cloud.instance_types import InstanceType
    from dstack.specs import JobSpec
    from dstack.store.hosts import Host
    from dstack.store.state import State

OVERRIDE_ENV = "DSTACK_EC2_SSH_OVERRIDE"


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
        itype = BY_NAME.get(Ec2Instance.of(host).instance_type)
        if host.status == "launching" and itype is not None and itype.fits(spec):
            return host.name
    home = home_id(state)
    with Clients() as clients:
        choices = offers(clients, cfg, spec)
        if not choices:
            return None
        known = {Ec2Instance.of(h).instance_id for h in ec2_hosts(state)}
        orphans = len(live_instance_ids(clients, cfg.regions, home) - known)  # count against the limit too
        name = _reserve(state, cfg, choices[0].itype, choices[0].region, orphans)
        if name is None:
            return None
        try:
            _launch(state, clients, cfg, choices, name, home)
        except BaseException:
            abandon(state, clients, name)
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
    instance = Ec2Instance(itype.name, region, launched_at=now, idle_timeout=cfg.idle_timeout)
    with state.transaction() as db:
        if len(store.list_hosts(db, kind=KIND)) + orphans >= cfg.max_instances:
            return None
        row = Host(name=name, kind=KIND, status="launching", cloud=instance.to_json(), created_at=now)
        store.insert_host(db, row)
    return name


def _launch(state: State, clients: Clients, cfg: AwsConfig, choices: list[Any], name: str, home: str) -> None:
    from dstack.cloud import launcher
    from dstack.home import sub

    deadline = time.time() + cfg.launch_timeout
    key_dir = sub("aws")
    offer, started, key_file = launcher.launch(clients, cfg, choices, home=home, host=name, key_dir=key_dir)
    host = launching_host(state, name)
    record = Ec2Instance.of(host)
    record.instance_id, record.instance_type = started["InstanceId"], offer.itype.name
    record.region, record.price, record.spot = offer.region, offer.price, offer.spot
    host.cloud, host.identity_file = record.to_json(), key_file
    save(state, host)
    ec2 = clients.ec2(offer.region)
    running = launcher.wait_running(ec2, started["InstanceId"], offer.region, deadline)
    host.user, host.hostname, host.port = _ssh_address(cfg, running)
    record.address = launcher.address_of(running)
    host.cloud = record.to_json()
    save(state, host)
    launcher.wait_ssh(host.hostname, host.port, deadline)
    capacity, host_key = _prepare(state, host, offer.itype, deadline)
    host.capacity, host.host_key, host.status = capacity, host_key, "ready"
    host.probed_at = record.ready_at = time.time()
    host.cloud = record.to_json()
    save(state, host)


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
    if not shares_address(state, host):
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


def abandon(state: State, clients: Clients, name: str) -> None:
    """A launch failed (or its process died): terminate what it started and forget the host."""
    host = get_host(state, name)
    if host is None:
        return
    try:
        terminate_instance(clients, host)
    finally:
        forget_host(state, host)


def terminate_instance(clients: Clients, host: Host) -> None:
    """Terminate the host's instance, if it got as far as having one."""
    from dstack.cloud.launcher import terminate_instances

    record = Ec2Instance.of(host)
    if record.instance_id:
        terminate_instances(clients.ec2(record.region), [record.instance_id], record.region)
