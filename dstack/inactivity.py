"""`inactivity: 30m`: a job with ports stops after that long with no connection to any of them.

The orchestrator counts established connections to the job's ports in the runner's own TCP table (what a
forward, a browser on the host, or a `docker` proxy holds all show up there), so it needs no help from
the CLI: a detached dev environment nobody uses stops too.
"""

from __future__ import annotations

import logging
import re
import time
from typing import TYPE_CHECKING

from dstack.errors import DstackError

if TYPE_CHECKING:
    from dstack.backends.base import Runner
    from dstack.store.state import Job, State

log = logging.getLogger("dstack.inactivity")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_DURATION = re.compile(
    r"^\s*(\d+(?:\.\d+)?)\s*(s|sec|secs|m|min|mins|h|hr|hrs|d|day|days)\s*$", re.IGNORECASE
)
CHECK_EVERY_S = 5.0


def parse_duration(text: str) -> float | None:
    """Seconds in `30s`, `30m`, `2h`, `1d`; 0 for `off`/`none`/`false`/`0`; None if it is not a duration."""
    if text.strip().lower() in ("off", "none", "false", "no", "0", "never"):
        return 0.0
    m = _DURATION.match(text)
    if not m:
        return None
    return float(m.group(1)) * _UNITS[m.group(2)[0].lower()]


def describe(seconds: float) -> str:
    """`3s`, `30m`, `2h`, as written back to the user."""
    for unit in ("d", "h", "m"):
        if seconds >= _UNITS[unit] and seconds % _UNITS[unit] == 0:
            return f"{seconds / _UNITS[unit]:g}{unit}"
    return f"{seconds:g}s"


_SEEN: dict[str, tuple[float, float]] = {}  # per job: when it last had a connection, when last checked


def stop_if_idle(state: State, runner: Runner, job: Job, keep: bool = False) -> bool:
    """Stop the job (True) when none of its ports had a connection for its `inactivity`."""
    from dstack.ports import established, job_ports

    limit = job.spec.inactivity_s or 0.0
    ports = job_ports(job.reserved)
    if not limit or not ports:
        return False
    now = time.time()
    active, checked = _SEEN.get(job.id, (job.started_at or now, 0.0))
    if now - checked < min(CHECK_EVERY_S, limit / 3):
        return False
    try:
        table = runner.tcp_table()
    except DstackError as e:
        log.info("could not count connections of %s: %s", job.id, e)
        return False
    if established(table, ports):
        active = now
    _SEEN[job.id] = (active, now)
    if now - active < limit:
        return False
    reason = f"stopped after {describe(limit)} without connections"
    if not state.transition(job.id, ("running",), status="stopped", reason=reason, finished_at=now):
        return False
    log.info("job %s: %s", job.id, reason)
    try:
        runner.stop_job(job.id)
        runner.cleanup_job(job.id, keep=keep)
    except DstackError as e:
        log.warning("could not stop idle job %s: %s", job.id, e)
    return True
