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
    sizes: dict[str, int] | None = None  # bytes in the files `poll_many` was asked about (missing: 0)


def launch(conn: Connection, directory: str, script: str = "run.sh", wait_pid: float = 10.0) -> int:
    """Start `bash <directory>/<script>` detached in its own session; return its pid once it is recorded."""
    out = conn.run(launch_command(directory, script, wait_pid), timeout=wait_pid + 30).stdout.strip()
    return int(out) if out.isdigit() else 0


def launch_command(directory: str, script: str = "run.sh", wait_pid: float = 10.0) -> str:
    """The shell command `launch` runs: start detached, wait for the pid file, print the pid."""
    d = shlex.quote(directory)
    return (
        f"cd {d} && rm -f pid exit && "
        f"(setsid nohup bash {shlex.quote(script)} > /dev/null 2>&1 < /dev/null &) && "
        f"i=0; while [ ! -s pid ] && [ $i -lt {int(wait_pid * 100)} ]; do sleep 0.01; i=$((i+1)); done; "
        "cat pid"
    )


def poll(conn: Connection, directory: str) -> ProcessState:
    """Whether the process runs, exited (with its code), or is gone without an exit code."""
    return poll_many(conn, [directory])[0]


_POLL_ONE = (
    'cd "$d" 2>/dev/null || { echo nodir; continue; }; '
    "if [ -f exit ]; then echo exit $(cat exit); continue; fi; "
    "if [ ! -s pid ]; then echo nopid; continue; fi; p=$(cat pid); "
    # alive and not a zombie (/proc when there is one, else ps)
    'z=; if kill -0 "$p" 2>/dev/null; then if [ -r "/proc/$p/stat" ]; then read -r z < "/proc/$p/stat"; '
    'z=${z##*) }; z=${z%% *}; else z=$(ps -o stat= -p "$p" 2>/dev/null | cut -c1); fi; fi; '
    'if [ -n "$z" ] && [ "$z" != Z ]; '
    'then echo running "$p"; elif [ -f exit ]; then echo exit $(cat exit); else echo gone "$p"; fi'
)


def poll_many(conn: Connection, directories: list[str], sizes: tuple[str, ...] = ()) -> list[ProcessState]:
    """`poll` for several processes in one remote command (one line of output each); with `sizes`, also the
    byte sizes of those files in each directory (measured after the state, so an exited one's are final)."""
    if not directories:
        return []
    args = " ".join(shlex.quote(d) for d in directories)
    command = f"for d in {args}; do {_POLL_ONE}; done"
    paths = [f"{d}/{name}" for d in directories for name in sizes]
    if paths:  # one `stat` for all: `=size path` lines (those that are missing say nothing)
        command += f"; stat -c '=%s %n' -- {' '.join(shlex.quote(p) for p in paths)} 2>/dev/null; exit 0"
    out = conn.run(command, timeout=POLL_TIMEOUT).stdout.splitlines()
    lines = [line for line in out if not line.startswith("=")]
    lines += [""] * (len(directories) - len(lines))
    states = [_state(line.split(), d) for line, d in zip(lines, directories, strict=False)]
    if paths:
        found = {}
        for line in out:
            size, _, path = line[1:].partition(" ")
            if line.startswith("=") and size.isdigit():
                found[path] = int(size)
        for state, d in zip(states, directories, strict=True):
            state.sizes = {name: found.get(f"{d}/{name}", 0) for name in sizes}
    return states


def _state(words: list[str], directory: str) -> ProcessState:
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
    """Up to `limit` bytes of the file from `offset` on (b'' if it is not there yet).

    Over SFTP; over the exec channel (`tail | head`) where the host's sshd has no SFTP subsystem.
    """
    from dstack.ssh.connection import NoSFTPError

    if conn.has_sftp is not False:
        try:
            with conn.sftp() as sftp:
                try:
                    with sftp.open(path, "rb") as f:
                        f.seek(offset)
                        return f.read(limit)
                except FileNotFoundError:
                    return b""
        except NoSFTPError:
            pass
    chunks: list[bytes] = []
    q = shlex.quote(path)
    conn.run_with_reader(
        f"[ -f {q} ] || exit 0; tail -c +{int(offset) + 1} {q} | head -c {int(limit)}",
        lambda out: chunks.append(out.read()),
        timeout=POLL_TIMEOUT * 3,
    )
    return b"".join(chunks)


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
