"""Orchestrator processes: each starts as a fresh interpreter (never a fork of a process that may have
threads), proves it is alive with a heartbeat, and is recovered by whichever command finds it gone or stuck:
restarted a few times with a backoff, then its run fails with the reason."""

from __future__ import annotations

import os
import signal
import sys
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dstack.store.state import Run, State

MAX_RESTARTS = 3
STALE_S = float(os.environ.get("DSTACK_ORCHESTRATOR_STALE_S", "120"))  # no heartbeat that long: stuck
BACKOFF_S = float(os.environ.get("DSTACK_ORCHESTRATOR_BACKOFF_S", "1"))  # 1, 2, 4 s between restarts
BEAT_S = min(1.0, STALE_S / 4)


def process_alive(pid: int) -> bool:
    """Whether the process exists and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def process_start(pid: int) -> str | None:
    """The kernel's start time of a process (guards against a reused pid)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def orchestrator_alive(run: Run) -> bool:
    """Whether the run's recorded orchestrator still runs (the same process, not a reused pid)."""
    if run.orchestrator_pid is None or not process_alive(run.orchestrator_pid):
        return False
    start = process_start(run.orchestrator_pid)
    return start is None or run.orchestrator_start is None or start == run.orchestrator_start


def orchestrator_stuck(run: Run, now: float | None = None) -> bool:
    """Alive but without a heartbeat for STALE_S seconds (deadlocked, or stopped)."""
    beat = run.heartbeat_at or run.created_at
    return (now or time.time()) - beat > STALE_S


def start_orchestrator(run_id: str) -> int:
    """Start a detached orchestrator for the run as a fresh process; it drives the run once no live process
    does (so it doubles as the stand-by of a CLI that drives the run while following it). Returns its pid."""
    import subprocess

    from dstack.home import home, sub

    log = sub("runs") / f"{run_id}.log"
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "dstack.scheduler.daemon", run_id],
            cwd=home(),
            stdin=subprocess.DEVNULL,
            stdout=fd,
            stderr=fd,
            start_new_session=True,
            close_fds=True,
        )
    finally:
        os.close(fd)
    proc.returncode = 0  # detached: never waited for here (the child reaper of the system adopts it)
    return proc.pid


def claim_run(state: State, run: Run) -> bool:
    """Make this process the run's orchestrator if no live process is."""
    me = os.getpid()
    return state.claim_orchestrator(run.id, me, process_start(me), run.orchestrator_pid)


def recover(state: State, run: Run) -> str | None:
    """Give a run whose orchestrator is gone or stuck a new one (at most MAX_RESTARTS times, with a backoff);
    after that fail it with the reason. Returns what was done ("restarted", "failed") or None."""
    from dstack.store.state import ACTIVE_RUN

    if run.status not in ACTIVE_RUN:
        return None
    now = time.time()
    alive = orchestrator_alive(run)
    if alive and not orchestrator_stuck(run, now):
        return None
    if run.orchestrator_pid is None and now - run.created_at < 10:
        return None  # its orchestrator is still starting
    why = "was stuck" if alive else "died"
    if alive and run.orchestrator_pid is not None:
        kill_orchestrator(run)
    if run.orchestrator_restarts < MAX_RESTARTS:
        last = run.orchestrator_restarted_at
        if last is not None and now < last + BACKOFF_S * 2 ** (run.orchestrator_restarts - 1):
            return None
        if state.count_restart(run.id, run.orchestrator_restarts):
            pid = start_orchestrator(run.id)  # the run is its own at once, so nobody starts a second one
            state.claim_orchestrator(run.id, pid, process_start(pid), run.orchestrator_pid)
            return "restarted"
        return None
    from dstack.runs import fail_run

    tail = last_orchestrator_line(run.id)
    reason = f"its orchestrator {why} {run.orchestrator_restarts + 1} times"
    reason += f"; last: {tail}" if tail else ""
    fail_run(state, run, reason)
    return "failed"


def kill_orchestrator(run: Run, only_stuck_cli: bool = False) -> None:
    """SIGKILL the run's orchestrator if it is the process recorded (a stuck one ignores anything gentler).
    With `only_stuck_cli`, a `dstack run` that drives the run while following it is killed only if stuck."""
    if run.orchestrator_pid is None or run.orchestrator_pid == os.getpid() or not orchestrator_alive(run):
        return
    if only_stuck_cli and not orchestrator_stuck(run) and not _is_orchestrator_process(run.orchestrator_pid):
        return  # it sees the run stopped at its next step and ends with a message
    try:
        os.kill(run.orchestrator_pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        return
    deadline = time.monotonic() + 2
    while process_alive(run.orchestrator_pid) and time.monotonic() < deadline:
        time.sleep(0.01)


def _is_orchestrator_process(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"dstack.scheduler.daemon" in f.read()
    except OSError:
        return True


def last_orchestrator_line(run_id: str) -> str:
    """The last line the run's orchestrators wrote (a crash's exception), cut to 200 characters."""
    from dstack.home import home

    path = home() / "runs" / f"{run_id}.log"
    try:
        with open(path, "rb") as f:
            f.seek(max(0, path.stat().st_size - 4096))
            lines = [x for x in f.read().decode(errors="replace").splitlines() if x.strip()]
    except OSError:
        return ""
    return lines[-1].strip()[:200] if lines else ""


def repair(state: State) -> list[Run]:
    """Recover every unfinished run whose orchestrator is gone or stuck; returns those runs."""
    return [run for run in state.runs(active_only=True) if recover(state, run)]


def orchestrate(run_id: str) -> None:
    """Drive a run to its end (in the detached orchestrator process): at once if no live process drives it,
    else as its stand-by, taking over when that process goes away or stops beating."""
    from dstack.store.state import ACTIVE_RUN, open_state

    state = open_state()
    try:
        while True:
            run = state.run(run_id)
            if run.status not in ACTIVE_RUN:
                return
            if run.orchestrator_pid == os.getpid():  # handed over by whoever started this process
                drive(state, run_id)
                return
            if orchestrator_alive(run) and not orchestrator_stuck(run):
                time.sleep(0.2)
                continue
            if claim_run(state, run):
                if run.orchestrator_pid is not None:
                    _log().info("took over run %s from process %s", run.name, run.orchestrator_pid)
                drive(state, run_id)
                return
    finally:
        state.close()


def drive(state: State, run_id: str) -> None:
    """Step the run (this process has claimed it) until it ends or another process takes it over."""
    from dstack.scheduler.loop import Orchestrator
    from dstack.store.disk import DiskError

    orch = Orchestrator(state, state.run(run_id))
    me = os.getpid()
    try:
        if not state.beat(run_id, me):  # (its imports may have taken a while)
            return
        orch.resume()
        beat = time.monotonic()
        while True:
            try:
                if orch.step():
                    return
                now = time.monotonic()
                if now - beat >= BEAT_S:
                    if not state.beat(run_id, me):
                        return  # taken over (we were stuck): the new orchestrator drives it
                    beat = now
            except DiskError as e:  # a full disk under DSTACK_HOME: wait for room rather than crash
                _log().warning("%s", e)
                time.sleep(1)
                continue
            time.sleep(poll_interval(time.monotonic() - orch.changed_at))
    finally:
        orch.close()


def poll_interval(elapsed: float) -> float:
    """How long to sleep between steps, `elapsed` seconds after a job last changed status: short at first (a
    quick job ends within milliseconds, a sweep's next ones start), then 0.2 s."""
    if elapsed < 0.5:
        return 0.005
    return 0.02 if elapsed < 3 else 0.2


def _log() -> Any:
    import logging

    return logging.getLogger("dstack.orchestrator")


def main(argv: list[str] | None = None) -> None:
    """`python -m dstack.scheduler.daemon RUN_ID`: the detached orchestrator process."""
    argv = sys.argv[1:] if argv is None else argv
    import logging
    import traceback

    logging.basicConfig(
        stream=sys.stderr, level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s"
    )
    logging.getLogger("paramiko").setLevel(logging.CRITICAL)
    try:
        orchestrate(argv[0])
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)


if __name__ == "__main__":
    from dstack.scheduler.daemon import main as _main  # the module's own copy, not this __main__ one

    _main()
