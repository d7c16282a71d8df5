"""Detached processes on a host: started with `setsid nohup`, tracked by the `pid` and `exit` files.

A process directory holds `run.sh` (see dstack.backends.script), which writes `pid` (also its process
group), `log` and, when it ends, `exit`. Nothing here depends on the SSH session that started it, so the
process survives the CLI exiting and the connection dropping, and any later connection can re-attach.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from dstack.ssh.connection import Connection

POLL_TIMEOUT = 10.0  # a host that answers nothing for this long is treated as unreachable
MAX_LOG_CHUNK = 4 * 1024 * 1024


@dataclass
class ProcessState:
    status: Literal["running", "exited", "lost"]
    exit_code: int | None = None
    pid: int | None = None
    reason: str | None = None


def launch(conn: Connection, directory: str, script: str = "run.sh", wait_pid: float = 10.0) -> int:
    """Start `bash <directory>/<script>` detached in its own session; return its pid once it is recorded."""
    d = shlex.quote(directory)
    command = (
        f"cd {d} && rm -f pid exit && "
        f"(setsid nohup bash {shlex.quote(script)} > /dev/null 2>&1 < /dev/null &) && "
        f"i=0; while [ ! -s pid ] && [ $i -lt {int(wait_pid * 100)} ]; do sleep 0.01; i=$((i+1)); done; "
        "cat pid"
    )
    out = conn.run(command, timeout=wait_pid + 30).stdout.strip()
    return int(out) if out.isdigit() else 0


def poll(conn: Connection, directory: str) -> ProcessState:
    """Whether the process runs, exited (with its code), or is gone without an exit code."""
    d = shlex.quote(directory)
    command = (
        f"cd {d} 2>/dev/null || {{ echo nodir; exit 0; }}; "
        "if [ -f exit ]; then echo exit $(cat exit); exit 0; fi; "
        "if [ ! -s pid ]; then echo nopid; exit 0; fi; p=$(cat pid); "
        'if kill -0 "$p" 2>/dev/null && [ "$(ps -o stat= -p "$p" 2>/dev/null | cut -c1)" != Z ]; '
        'then echo running "$p"; elif [ -f exit ]; then echo exit $(cat exit); else echo gone "$p"; fi'
    )
    words = conn.run(command, timeout=POLL_TIMEOUT).stdout.split()
    if not words:
        return ProcessState("lost", reason="the host said nothing about the job")
    kind = words[0]
    if kind == "exit":
        code = int(words[1]) if len(words) > 1 and words[1].lstrip("-").isdigit() else 1
        return ProcessState("exited", exit_code=code)
    if kind == "running":
        return ProcessState("running", pid=int(words[1]))
    if kind == "nodir":
        return ProcessState("lost", reason=f"the job's directory {directory} is gone from the host")
    if kind == "nopid":
        return ProcessState("lost", reason="the job's process never started")
    return ProcessState(
        "lost", pid=int(words[1]), reason=f"the job's process (pid {words[1]}) is gone without an exit code"
    )


def read_file(conn: Connection, path: str, offset: int, limit: int = MAX_LOG_CHUNK) -> bytes:
    """Up to `limit` bytes of the file from `offset` on (b'' if it is not there yet)."""
    with conn.sftp() as sftp:
        try:
            with sftp.open(path, "rb") as f:
                f.seek(offset)
                return f.read(limit)
        except FileNotFoundError:
            return b""


def stop(conn: Connection, directory: str, grace: float = 5.0) -> None:
    """SIGTERM the process group, then SIGKILL what is left after `grace` seconds."""
    d = shlex.quote(directory)
    steps = int(grace * 20)
    command = (
        f"cd {d} 2>/dev/null && [ -s pid ] || exit 0; p=$(cat pid); "
        'kill -TERM -- "-$p" 2>/dev/null || exit 0; '
        f'i=0; while kill -0 -- "-$p" 2>/dev/null && [ $i -lt {steps} ]; do sleep 0.05; i=$((i+1)); done; '
        'kill -KILL -- "-$p" 2>/dev/null; exit 0'
    )
    conn.run(command, timeout=grace + 30)
