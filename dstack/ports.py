"""A job's ports: chosen free on its runner, never the same port for two active jobs there.

The runner's TCP table (`/proc/net/tcp*`, read on the runner itself) says which ports are taken; the
ports a job gets are kept in its `reserved` row, so placement never hands them to a second job. The
same table counts the connections to a job's ports, which is how `inactivity:` sees an idle job.
"""

from __future__ import annotations

import os
import random
from typing import TYPE_CHECKING

from dstack.errors import RunError
from dstack.store.reservation import Reservation

if TYPE_CHECKING:
    from dstack.backends.base import Runner
    from dstack.specs import JobSpec
    from dstack.store.state import State

# below Linux's default ephemeral range (32768-60999), so an outgoing connection never takes one meanwhile
PORT_RANGE = (10000, 32000)


def port_range() -> tuple[int, int]:
    """Where counted ports come from: PORT_RANGE, or `DSTACK_PORT_RANGE=LO-HI` (both included)."""
    text = os.environ.get("DSTACK_PORT_RANGE", "")
    lo, _, hi = text.partition("-")
    if lo.strip().isdigit() and hi.strip().isdigit() and 0 < int(lo) <= int(hi) < 65536:
        return int(lo), int(hi) + 1
    return PORT_RANGE


_LISTEN, _ESTABLISHED = "0A", "01"


def parse_tcp_table(text: str) -> list[tuple[int, str]]:
    """(local port, state) of each socket in `/proc/net/tcp` and `/proc/net/tcp6` text."""
    rows = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 4 or ":" not in parts[1] or parts[0] == "sl":
            continue
        try:
            rows.append((int(parts[1].rsplit(":", 1)[1], 16), parts[3].upper()))
        except ValueError:
            continue
    return rows


def read_local_tcp_table() -> str:
    """This machine's TCP table ("" where there is no /proc, as on macOS)."""
    text = ""
    for path in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(path) as f:
                text += f.read()
        except OSError:
            pass
    return text


def established(table: str, ports: list[int]) -> int:
    """How many established connections the table shows to (not from) one of `ports`."""
    wanted = set(ports)
    return sum(1 for port, st in parse_tcp_table(table) if st == _ESTABLISHED and port in wanted)


def held_ports(state: State, runner: str) -> set[int]:
    """The ports active jobs on `runner` hold (call inside a transaction)."""
    return {int(p) for r in state.reservations(runner) for p in r.ports}


def choose_ports(state: State, runner: Runner, job_id: str, spec: JobSpec) -> list[int]:
    """Take the job's ports on `runner` ($PORT_0… in order: the counted ones, then the fixed ones) and
    record them in the job's reservation; RunError if a fixed port is taken on the host."""
    if not spec.ports.count and not spec.ports.fixed:
        return []
    rows = parse_tcp_table(runner.tcp_table())
    in_use = {port for port, _ in rows}  # any state: a port in TIME_WAIT is not handed out either
    taken = [p for p in spec.ports.fixed if (p, _LISTEN) in rows]
    if taken:
        raise RunError(
            f"port {taken[0]} is already in use on {runner.name}",
            hint="ask for `ports: N` instead of fixed numbers, or free that port",
        )
    with state.transaction():
        held = held_ports(state, runner.name)
        free = [p for p in range(*port_range()) if p not in in_use and p not in held]
        if len(free) < spec.ports.count:
            raise RunError(f"{runner.name} has no {spec.ports.count} free ports")
        ports = random.sample(free, spec.ports.count) + list(spec.ports.fixed)
        job = state.job(job_id)
        reserved = job.reserved or Reservation()
        reserved.ports = ports
        state.set_job(job_id, reserved=reserved)
    return ports


def job_ports(reserved: Reservation | None) -> list[int]:
    """The ports recorded for a job ($PORT_0 first)."""
    return [int(p) for p in reserved.ports] if reserved is not None else []
