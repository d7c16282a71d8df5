"""Runner hosts: adding (connect, pin the host key, probe, store), checking, removing, enabling, listing.

This machine is the runner `local`; SSH hosts are reached through `dstack.ssh`. Probing runs one remote
command that prints `key=value` lines: CPUs, memory, free disk, GPUs (nvidia-smi), Docker, OS, Python, rsync.
"""

from __future__ import annotations

import sqlite3
import subprocess
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from dstack.backends.base import Capacity, GpuInfo
from dstack.errors import DstackError, HostError, NotFoundError, UsageError
from dstack.store import hosts as store
from dstack.store.hosts import Host

if TYPE_CHECKING:
    from dstack.backends.slurm_cluster import SlurmOptions
    from dstack.ssh.config import SSHTarget
    from dstack.ssh.connection import Connection

LOCAL = "local"

PROBE_SCRIPT = r"""
root=${1:-$HOME/.dstack}
mkdir -p "$root" 2>/dev/null
echo "cpus=$(nproc 2>/dev/null || getconf _NPROCESSORS_ONLN 2>/dev/null || sysctl -n hw.ncpu 2>/dev/null)"
if [ -r /proc/meminfo ]; then
  echo "memory_kib=$(awk '/^MemTotal:/ {print $2}' /proc/meminfo)"
else
  echo "memory_kib=$(( $(sysctl -n hw.memsize 2>/dev/null || echo 0) / 1024 ))"
fi
echo "disk_free_kib=$(df -Pk "$root" 2>/dev/null | awk 'NR==2 {print $4}')"
if [ -r /etc/os-release ]; then echo "os=$(. /etc/os-release && echo "${PRETTY_NAME:-$NAME}")"
else echo "os=$(uname -sr)"; fi
echo "arch=$(uname -m)"
echo "python=$(python3 -c 'import platform; print(platform.python_version())' 2>/dev/null)"
if command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; then echo docker=1
else echo docker=0; fi
if command -v rsync >/dev/null 2>&1; then echo rsync=1; else echo rsync=0; fi
echo "home=$HOME"
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader,nounits 2>/dev/null | sed 's/^/gpu=/'
fi
"""

AcceptKey = Callable[[str], bool]


def parse_probe(output: str) -> Capacity:
    """A Capacity from the probe script's `key=value` lines; HostError if essentials are missing."""
    values: dict[str, str] = {}
    gpus: list[GpuInfo] = []
    for line in output.splitlines():
        key, sep, value = line.partition("=")
        if not sep:
            continue
        key, value = key.strip(), value.strip()
        if key == "gpu":
            parts = [p.strip() for p in value.split(",")]
            if len(parts) >= 3 and parts[0].isdigit():
                try:
                    memory = int(float(parts[-1]))
                except ValueError:
                    memory = 0
                gpus.append(GpuInfo(index=int(parts[0]), name=",".join(parts[1:-1]), memory_mib=memory))
        else:
            values[key] = value
    try:
        cpus = float(values["cpus"])
        memory_mib = int(values["memory_kib"]) // 1024
    except (KeyError, ValueError) as exc:
        raise HostError(
            f"could not read the host's CPUs and memory from its probe: {output.strip()[:200]!r}"
        ) from exc
    disk = values.get("disk_free_kib", "")
    arch = values.get("arch", "")
    os_name = values.get("os", "")
    return Capacity(
        cpus=cpus,
        memory_mib=memory_mib,
        gpus=gpus,
        disk_free_mib=int(disk) // 1024 if disk.isdigit() else 0,
        docker=values.get("docker") == "1",
        os=f"{os_name} ({arch})" if arch and os_name else os_name,
        python=values.get("python", ""),
        rsync=values.get("rsync") == "1",
    )


def probe(conn: Connection, root: str | None = None) -> Capacity:
    """Find what a host has, in one remote command."""
    import shlex

    arg = f" {shlex.quote(root)}" if root else ""
    result = conn.run(f"bash -s -- {arg}", input=PROBE_SCRIPT, timeout=60)
    return parse_probe(result.stdout)


def probe_local() -> Capacity:
    """Find what this machine has, with the same script as for hosts."""
    from dstack.home import home

    try:
        out = subprocess.run(
            ["bash", "-s", "--", str(home())],
            input=PROBE_SCRIPT,
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout
    except (subprocess.SubprocessError, OSError) as exc:
        raise HostError(f"could not probe this machine: {exc}") from exc
    return parse_probe(out)


def target_of(host: Host) -> SSHTarget:
    """How to connect to a registered SSH host."""
    from dstack.ssh.config import SSHTarget, parse_address

    if host.kind == LOCAL or not host.hostname:
        raise UsageError(f"{host.name} is not an SSH host")
    return SSHTarget(
        alias=parse_address(host.address)[1] if host.address else host.hostname,
        hostname=host.hostname,
        port=host.port or 22,
        user=host.user or "",
        identity_files=(host.identity_file,) if host.identity_file else (),
        proxy_jump=host.proxy_jump,
    )


def connect(host: Host) -> Connection:
    """The process's connection to a registered host (its key must match the pinned one)."""
    from dstack.ssh.connection import get_connection

    return get_connection(target_of(host), name=host.name)


def _check_name(name: str) -> str:
    import re

    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}", name):
        raise UsageError(f"invalid host name {name!r}", hint="use letters, digits, '.', '-' and '_'")
    return name


def add_host(
    db: sqlite3.Connection,
    address: str,
    *,
    name: str | None = None,
    identity: str | None = None,
    accept: AcceptKey | None = None,
    proxy_jump: str | None = None,
    slurm: SlurmOptions | None = None,
) -> Host:
    """Register an SSH host: resolve `user@host[:port]` via ~/.ssh/config, connect, pin its key, probe, store.

    `accept(fingerprint)` is asked the first time a host key is seen; without it an unknown key is refused.
    With `slurm`, the host is a Slurm cluster's login node and the cluster is registered as one runner.
    """
    from dstack.ssh.config import resolve_target
    from dstack.ssh.connection import get_connection

    target = resolve_target(address, identity=identity, proxy_jump=proxy_jump)
    name = _check_name(name or target.alias)
    if name == LOCAL:
        raise UsageError("the name 'local' is taken by this machine", hint="pass --name")
    if store.get_host(db, name) is not None:
        raise UsageError(
            f"a host named {name!r} already exists",
            hint=f"pass --name, or `dstack hosts remove {name}` first",
        )
    conn = get_connection(target, name=name, accept=accept)
    cloud = None
    if slurm is not None:
        from dstack.backends.slurm_cluster import read_cluster

        cluster = read_cluster(conn, slurm, address)
        capacity, cloud = cluster.capacity(), cluster.to_json()
    else:
        capacity = probe(conn)
    now = time.time()
    host = Host(
        name=name,
        kind="slurm" if slurm is not None else "ssh",
        cloud=cloud,
        user=target.user,
        hostname=target.hostname,
        port=target.port,
        identity_file=target.identity_files[0] if target.identity_files else None,
        proxy_jump=target.proxy_jump,
        address=address,
        host_key=conn.host_key,
        capacity=capacity,
        probed_at=now,
        created_at=now,
    )
    if not store.insert_host(db, host):
        raise UsageError(f"a host named {name!r} already exists")
    return host


def check_host(db: sqlite3.Connection, name: str) -> Host:
    """Probe a host again; it becomes `ready`, or `unreachable` with the reason (returned, not raised)."""
    if name == LOCAL:
        return local_host(db)
    host = get(db, name)
    try:
        conn = connect(host)
        if host.kind == "slurm":
            from dstack.backends.slurm_cluster import SlurmCluster, read_cluster

            cluster = read_cluster(conn, SlurmCluster.from_json(host.cloud).options, host.address or name)
            capacity = cluster.capacity()
            store.save_cloud(db, name, cluster.to_json())
        else:
            capacity = probe(conn)
    except DstackError as exc:
        store.mark_unreachable(db, name, str(exc))
    else:
        store.save_probe(db, name, capacity, host_key=conn.host_key)
    return get(db, name)


def check_hosts(db: sqlite3.Connection) -> list[Host]:
    """Probe every SSH host (see `check_host`)."""
    return [check_host(db, h.name) for h in store.list_hosts(db) if h.kind in ("ssh", "slurm")]


def remove_host(db: sqlite3.Connection, name: str) -> Host:
    """Forget a host and its pinned key (unless another host name uses the same address)."""
    from dstack.ssh.connection import unpin_key

    if name == LOCAL:
        raise UsageError(
            "the runner 'local' can't be removed", hint="`dstack hosts disable local` turns it off"
        )
    host = get(db, name)
    store.delete_host(db, name)
    shared = host.hostname and store.hosts_at(db, host.hostname, host.port or 22)
    if host.kind in ("ssh", "slurm") and host.hostname and not shared:
        unpin_key(target_of(host))
    return host


def set_enabled(db: sqlite3.Connection, name: str, enabled: bool) -> Host:
    """Let a runner take jobs (`enable`) or not (`disable`); `local` included."""
    if name == LOCAL:
        store.set_local_enabled(db, enabled)
        return local_host(db)
    if not store.set_enabled(db, name, enabled):
        raise _not_found(db, name)
    return get(db, name)


def get(db: sqlite3.Connection, name: str) -> Host:
    """The host called `name`; NotFoundError naming the known ones if there is none."""
    if name == LOCAL:
        return local_host(db)
    host = store.get_host(db, name)
    if host is None:
        raise _not_found(db, name)
    return host


def _not_found(db: sqlite3.Connection, name: str) -> NotFoundError:
    names = [LOCAL] + [h.name for h in store.list_hosts(db)]
    return NotFoundError(f"no host named {name!r}", hint=f"known hosts: {', '.join(names)}")


def local_host(db: sqlite3.Connection, capacity: Capacity | None = None) -> Host:
    """This machine as a runner: not a row of `hosts`; its on/off switch is the `local.enabled` setting."""
    import getpass
    import socket

    enabled = store.local_enabled(db)
    return Host(
        name=LOCAL,
        kind=LOCAL,
        user=getpass.getuser(),
        hostname=socket.gethostname(),
        enabled=enabled,
        status="ready" if enabled else "disabled",
        capacity=capacity if capacity is not None else probe_local(),
        probed_at=time.time(),
    )


def list_hosts(db: sqlite3.Connection, *, include_local: bool = True) -> list[Host]:
    """Every runner: `local` first, then registered hosts by name (as last probed; see `check_hosts`)."""
    hosts = store.list_hosts(db)
    return ([local_host(db)] if include_local else []) + hosts
