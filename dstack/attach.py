"""Attaching to a run: forwards for its running jobs' ports, and the `http://localhost:PORT` URL of each once
something answers there. Jobs on this machine need no forward: their ports are already on localhost.
"""

from __future__ import annotations

import re
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from dstack.errors import DstackError
from dstack.ports import job_ports

if TYPE_CHECKING:
    from dstack.store.state import Job, State

REFRESH_S = 0.1


class PortEnd(Protocol):
    """One port of a job as reached from here."""

    remote_port: int
    refused: str | None  # why the host will never forward it (None: it may)

    @property
    def local_port(self) -> int: ...

    def close(self) -> None: ...


@dataclass
class LocalPort:
    """A port of a job on this machine: nothing to forward."""

    remote_port: int
    refused: str | None = None

    @property
    def local_port(self) -> int:
        return self.remote_port

    def close(self) -> None:
        pass


@dataclass
class PortEvent:
    """A port of a job is waiting for its server (`url` None) or answers at `url`."""

    workflow: str
    job_id: str
    remote_port: int
    local_port: int
    url: str | None = None
    error: str | None = None  # the port can't be reached from here: why


def asks_for_ports(jobs: list[Job]) -> bool:
    """Whether one of the jobs will have ports."""
    from dstack.spec_view import spec_view

    for job in jobs:
        ports = spec_view(job.spec).ports
        if job.status != "reused" and (ports.count or ports.fixed):
            return True
    return False


def open_port_ends(state: State, job: Job) -> list[PortEnd]:
    """Forwards to the job's ports (none needed on this machine); only the job's own ports."""
    ports = job_ports(job.reserved)
    if not ports:
        return []
    if (job.runner or "local") == "local":
        return [LocalPort(p) for p in ports]
    from dstack.hosts import get, target_of
    from dstack.ssh.connection import get_connection
    from dstack.ssh.forward import Forward

    target = target_of(get(state.db, job.runner or "local"))
    get_connection(target, name=job.runner)  # connect now, not on the first request
    ends: list[PortEnd] = []
    try:
        for port in ports:
            ends.append(Forward(target, port, name=job.runner))
    except OSError:
        for end in ends:
            end.close()
        raise
    return ends


def answers(port: int, timeout: float = 2.0) -> bool:
    """Whether a server answers a request at 127.0.0.1:`port` here (any bytes back count)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
            sock.sendall(b"HEAD / HTTP/1.0\r\nHost: localhost\r\n\r\n")
            return bool(sock.recv(1))
    except OSError:
        return False


_URL = re.compile(r"https?://(?:localhost|127\.0\.0\.1|0\.0\.0\.0):(\d+)(/\S*)?")


def printed_path(log_path: str | None, remote_port: int) -> str:
    """The path (and query, e.g. a token) of the last URL the job printed for `remote_port`, or ""."""
    if not log_path:
        return ""
    try:
        with open(log_path, "rb") as f:
            text = f.read(1 << 20).decode(errors="replace")
    except OSError:
        return ""
    for m in _URL.finditer(
        text
    ):  # the first one with a path: the job's own line, printed before the server's
        if int(m.group(1)) == remote_port and m.group(2) and m.group(2) != "/":
            return m.group(2).rstrip(".,;)'\"")
    return ""


class PortWatcher:
    """In a thread: opens ports for the run's running jobs, closes those of finished jobs, and reports each
    port through `on_event` (waiting, then its URL once it answers)."""

    def __init__(self, run_id: str, on_event: Callable[[PortEvent], None]) -> None:
        self.run_id = run_id
        self.on_event = on_event
        self.ends: dict[str, list[PortEnd]] = {}
        self.errors: list[str] = []
        self._announced: set[tuple[str, int]] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="ports", daemon=True)

    def start(self) -> PortWatcher:
        self._thread.start()
        return self

    def _loop(self) -> None:
        from dstack.store.state import open_state

        with open_state() as state:
            while not self._stop.is_set():
                self.refresh(state)
                self._stop.wait(REFRESH_S)
        self._close_all()

    def refresh(self, state: State) -> None:
        """One pass: open, close and check the ports of the run's jobs."""
        jobs = state.jobs(self.run_id)
        for job in jobs:  # from `starting` on: the SSH handshake overlaps the job's own start
            live = job.status in ("starting", "running")
            if not live and job.id in self.ends:
                for end in self.ends.pop(job.id):
                    end.close()
            if not live or not job_ports(job.reserved):
                continue
            if job.id not in self.ends:
                try:
                    self.ends[job.id] = open_port_ends(state, job)
                except (DstackError, OSError) as e:
                    self.errors.append(f"{job.workflow}: {e}")
                    self.ends[job.id] = []
                    self.on_event(PortEvent(job.workflow, job.id, 0, 0, error=f"cannot open its ports: {e}"))
                    continue
                for end in self.ends[job.id]:
                    self.on_event(PortEvent(job.workflow, job.id, end.remote_port, end.local_port))
            for end in self.ends[job.id]:
                refused = end.refused
                if refused and refused not in self.errors:
                    self.errors.append(refused)
                    self.on_event(
                        PortEvent(job.workflow, job.id, end.remote_port, end.local_port, error=refused)
                    )
                key = (job.id, end.remote_port)
                if key in self._announced or not answers(end.local_port, timeout=1.0):
                    continue
                self._announced.add(key)
                path = printed_path(state.job(job.id).log_path, end.remote_port)
                url = f"http://localhost:{end.local_port}{path}"
                self.on_event(PortEvent(job.workflow, job.id, end.remote_port, end.local_port, url))

    def waiting(self) -> bool:
        """Whether a port opened has not answered yet."""
        return any((j, e.remote_port) not in self._announced for j, ends in self.ends.items() for e in ends)

    def _close_all(self) -> None:
        for ends in self.ends.values():
            for end in ends:
                end.close()
        self.ends.clear()

    def stop(self) -> None:
        """Close every forward (the jobs go on)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)
        else:
            self._close_all()


def wait_answering(port: int, timeout: float) -> bool:
    """Poll until a server answers at 127.0.0.1:`port` (True) or `timeout` seconds pass."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if answers(port, timeout=1.0):
            return True
        time.sleep(0.1)
    return False
