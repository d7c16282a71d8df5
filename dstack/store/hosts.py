"""All SQL of the `hosts` table: registered runners (SSH hosts, EC2 instances) and what they have."""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from dstack.backends.base import Capacity

_COLUMNS = (
    "name",
    "kind",
    "user",
    "hostname",
    "port",
    "identity_file",
    "proxy_jump",
    "address",
    "host_key",
    "enabled",
    "status",
    "capacity",
    "cloud",
    "last_error",
    "probed_at",
    "created_at",
    "last_used_at",
)


@dataclass
class Host:
    """One row of `hosts`: a runner as the user registered it, and what its last probe found."""

    name: str
    kind: str  # 'local' | 'ssh' | 'ec2' | 'slurm'
    user: str | None = None
    hostname: str | None = None
    port: int | None = None
    identity_file: str | None = None
    proxy_jump: str | None = None
    address: str | None = None  # as the user typed it
    host_key: str | None = None  # pinned: '<keytype> <base64>'
    enabled: bool = True
    status: str = "ready"  # ready | unreachable | disabled
    capacity: Capacity | None = None
    cloud: dict[str, Any] | None = None
    last_error: str | None = None
    probed_at: float | None = None
    created_at: float = field(default_factory=time.time)
    last_used_at: float | None = None

    def to_json(self) -> dict[str, Any]:
        """The row as plain JSON-able data (for `dstack hosts --json`)."""
        return asdict(self)


def capacity_to_json(capacity: Capacity | None) -> str | None:
    return None if capacity is None else json.dumps(asdict(capacity), sort_keys=True)


def capacity_from_json(text: str | None) -> Capacity | None:
    if not text:
        return None
    return Capacity.from_json(json.loads(text))


def _from_row(row: sqlite3.Row | tuple) -> Host:
    values = dict(zip(_COLUMNS, tuple(row), strict=True))
    values["enabled"] = bool(values["enabled"])
    values["capacity"] = capacity_from_json(values["capacity"])
    values["cloud"] = json.loads(values["cloud"]) if values["cloud"] else None
    return Host(**values)


def _to_row(host: Host) -> tuple:
    values = asdict(host)
    values["enabled"] = int(host.enabled)
    values["capacity"] = capacity_to_json(host.capacity)
    values["cloud"] = json.dumps(host.cloud, sort_keys=True) if host.cloud is not None else None
    return tuple(values[c] for c in _COLUMNS)


_SELECT = f"SELECT {', '.join(_COLUMNS)} FROM hosts"


def insert_host(db: sqlite3.Connection, host: Host) -> bool:
    """Insert a new host; False if one with that name exists (nothing is changed then)."""
    placeholders = ", ".join("?" for _ in _COLUMNS)
    cur = db.execute(
        f"INSERT INTO hosts ({', '.join(_COLUMNS)}) VALUES ({placeholders}) ON CONFLICT(name) DO NOTHING",
        _to_row(host),
    )
    return cur.rowcount == 1


def get_host(db: sqlite3.Connection, name: str) -> Host | None:
    """The host called `name`, or None."""
    row = db.execute(f"{_SELECT} WHERE name = ?", (name,)).fetchone()
    return _from_row(row) if row is not None else None


def list_hosts(db: sqlite3.Connection, kind: str | None = None) -> list[Host]:
    """All hosts (of one kind if given), by name."""
    if kind is None:
        rows = db.execute(f"{_SELECT} ORDER BY name").fetchall()
    else:
        rows = db.execute(f"{_SELECT} WHERE kind = ? ORDER BY name", (kind,)).fetchall()
    return [_from_row(r) for r in rows]


def hosts_at(db: sqlite3.Connection, hostname: str, port: int) -> list[Host]:
    """Hosts registered at one address (several names may share a machine)."""
    rows = db.execute(f"{_SELECT} WHERE hostname = ? AND port = ?", (hostname, port)).fetchall()
    return [_from_row(r) for r in rows]


def delete_host(db: sqlite3.Connection, name: str) -> bool:
    """Delete a host; whether there was one."""
    return db.execute("DELETE FROM hosts WHERE name = ?", (name,)).rowcount == 1


def save_probe(
    db: sqlite3.Connection,
    name: str,
    capacity: Capacity,
    host_key: str | None = None,
    when: float | None = None,
) -> None:
    """Record what a probe found; the host becomes ready (unless disabled) and its error is cleared."""
    db.execute(
        "UPDATE hosts SET capacity = ?, probed_at = ?, last_error = NULL, host_key = COALESCE(?, host_key),"
        " status = CASE WHEN enabled = 1 THEN 'ready' ELSE 'disabled' END WHERE name = ?",
        (capacity_to_json(capacity), when or time.time(), host_key, name),
    )


def save_cloud(db: sqlite3.Connection, name: str, cloud: dict[str, Any]) -> None:
    """Record what the host's provider says about it (an EC2 instance, a Slurm cluster's partitions)."""
    db.execute("UPDATE hosts SET cloud = ? WHERE name = ?", (json.dumps(cloud, sort_keys=True), name))


def mark_unreachable(db: sqlite3.Connection, name: str, error: str, when: float | None = None) -> None:
    """Record that the host did not answer (or refused us), with the one-line reason."""
    db.execute(
        "UPDATE hosts SET status = CASE WHEN enabled = 1 THEN 'unreachable' ELSE 'disabled' END,"
        " last_error = ?, probed_at = ? WHERE name = ?",
        (error, when or time.time(), name),
    )


def set_enabled(db: sqlite3.Connection, name: str, enabled: bool) -> bool:
    """Turn a host on or off for placement; whether it exists."""
    cur = db.execute(
        "UPDATE hosts SET enabled = ?, status = CASE WHEN ? THEN"
        " (CASE WHEN last_error IS NULL THEN 'ready' ELSE 'unreachable' END) ELSE 'disabled' END"
        " WHERE name = ?",
        (int(enabled), int(enabled), name),
    )
    return cur.rowcount == 1


def touch_host(db: sqlite3.Connection, name: str, when: float | None = None) -> None:
    """Record that a job was placed on the host."""
    db.execute("UPDATE hosts SET last_used_at = ? WHERE name = ?", (when or time.time(), name))


def local_enabled(db: sqlite3.Connection) -> bool:
    """Whether the runner `local` (this machine) takes jobs (the `local.enabled` setting)."""
    row = db.execute("SELECT value FROM settings WHERE key = 'local.enabled'").fetchone()
    return row is None or row[0] != "0"


def set_local_enabled(db: sqlite3.Connection, enabled: bool) -> None:
    """Turn the runner `local` on or off."""
    db.execute(
        "INSERT INTO settings (key, value) VALUES ('local.enabled', ?)"
        " ON CONFLICT(key) DO UPDATE SET value = excluded.value",
        ("1" if enabled else "0",),
    )


def ready_capacities(db: sqlite3.Connection) -> list[tuple[str, Capacity]]:
    """(name, capacity) of every enabled host that answered at its last check (what placement may use)."""
    rows = db.execute(
        "SELECT name, capacity FROM hosts WHERE kind != 'local' AND enabled = 1 AND status = 'ready' "
        "AND capacity IS NOT NULL"
    )
    return [(row[0], cap) for row in rows if (cap := capacity_from_json(row[1])) is not None]
