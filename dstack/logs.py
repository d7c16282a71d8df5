"""Following a run: its jobs' output and status changes, from the start or as they come."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from dstack.store.state import ACTIVE_RUN, Job, State

if TYPE_CHECKING:
    from dstack.scheduler.loop import Orchestrator


STANDBY_AFTER_S = 0.3  # a run that ends sooner never needs another process


@dataclass
class LogEvent:
    """A line of a job's output, a change of a job's status, or the header of a job's next attempt."""

    workflow: str
    job_id: str
    text: str
    kind: str = "log"  # "log" | "status" | "attempt"


def attempts_of(job: Job) -> list[tuple[int, str | None, str | None]]:
    """(attempt, runner, log file) of each attempt of the job so far, the current one last."""
    earlier = [(int(a["attempt"]), a.get("runner"), a.get("log_path")) for a in job.attempts]
    return [*earlier, (job.attempt, job.runner, job.log_path)]


def follow_run(
    state: State, run_id: str, follow: bool = True, poll: float = 0.05, drive: bool = False
) -> Iterator[LogEvent]:
    """Yield the run's output (and status changes) from the start; with `follow`, until the run ends. With
    `drive`, this process (which claimed the run) also steps it, so a short job ends without waiting on
    another process; a run nobody drives any more is recovered (see `dstack.scheduler.daemon.recover`)."""
    from dstack.scheduler.daemon import BEAT_S, poll_interval, recover, start_orchestrator

    orch: Orchestrator | None = None
    handler = None
    if drive:
        from dstack.scheduler.loop import Orchestrator

        handler = _log_to_run_file(run_id)  # what the orchestrator says goes where a detached one's goes
        orch = Orchestrator(state, state.run(run_id))
    standby = not drive  # a driving follower starts its stand-by once the run lasts (or it stops following)
    offsets: dict[tuple[str, int], int] = {}
    partial: dict[tuple[str, int], bytes] = {}
    seen: dict[str, str] = {}
    started = beat = next_step = time.monotonic()
    try:
        while True:
            now = time.monotonic()
            if not standby and now - started > STANDBY_AFTER_S:
                standby = bool(start_orchestrator(run_id))
            if orch is not None and now >= next_step:
                next_step = now + poll_interval(now - orch.changed_at)
                if now - beat >= BEAT_S:
                    beat = now
                    if not state.beat(run_id, os.getpid()):
                        orch.close()  # another process took the run over: only follow it now
                        orch = None
                if orch is not None and orch.step():
                    orch.close()
                    orch = None
            run = state.run(run_id)
            done = run.status not in ACTIVE_RUN
            if not done and follow and orch is None and not drive:
                recover(state, run)
            for job in state.jobs(run_id):
                label = job.status if not job.reason else f"{job.status}: {job.reason}"
                if seen.get(job.id) != label:
                    seen[job.id] = label
                    yield LogEvent(job.workflow, job.id, label, "status")
                segments = attempts_of(job)
                for attempt, runner, path in segments:
                    key = (job.id, attempt)
                    data = _read_from(path, offsets.get(key, 0))
                    if not data:
                        continue
                    if key not in offsets and (attempt > 1 or len(segments) > 1):
                        for earlier in [k for k in partial if k[0] == job.id]:
                            tail = partial.pop(earlier).decode(errors="replace")
                            yield LogEvent(job.workflow, job.id, tail)
                        text = f"── attempt {attempt} on {runner or 'local'} ──"
                        yield LogEvent(job.workflow, job.id, text, "attempt")
                    offsets[key] = offsets.get(key, 0) + len(data)
                    data = partial.pop(key, b"") + data
                    lines = data.split(b"\n")
                    if lines[-1]:
                        partial[key] = lines[-1]
                    for line in lines[:-1]:
                        yield LogEvent(job.workflow, job.id, line.decode(errors="replace"))
            if done or not follow:
                for (job_id, _), rest in partial.items():
                    job = state.job(job_id)
                    yield LogEvent(job.workflow, job_id, rest.decode(errors="replace"))
                return
            if orch is None and drive and not done:
                drive = False  # taken over: recover it like any follower from now on
            pause = poll if orch is None else min(poll, max(0.0, next_step - time.monotonic()))
            time.sleep(pause)
    finally:
        if orch is not None:
            orch.close()
        if handler is not None:
            import logging

            logging.getLogger("dstack").removeHandler(handler)
            handler.close()
        if not standby and state.run(run_id).status in ACTIVE_RUN:
            start_orchestrator(run_id)  # this process stops driving: the run goes on without it


def _log_to_run_file(run_id: str) -> Any:
    """A handler that appends dstack's log records to the run's orchestrator log (`runs/<id>.log`)."""
    import logging

    from dstack.home import sub

    handler = logging.FileHandler(sub("runs") / f"{run_id}.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    logger = logging.getLogger("dstack")
    logger.addHandler(handler)
    if logger.getEffectiveLevel() > logging.INFO:
        logger.setLevel(logging.INFO)
    return handler


def _read_from(path: str | None, offset: int) -> bytes:
    if not path:
        return b""
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read()
    except FileNotFoundError:
        return b""


def follow_rank(
    state: State, run_id: str, rank: int, follow: bool = True, poll: float = 0.5
) -> Iterator[bytes]:
    """Rank `rank`'s output of the run's multi-node jobs, read from their runner; `follow`: to the end."""
    from dstack.backends import open_runner
    from dstack.errors import UsageError

    run = state.run(run_id)
    jobs = [j for j in state.jobs(run_id) if j.spec.resources.nodes > rank]
    if not jobs or rank < 0:
        raise UsageError(
            f"run {run.name} has no job with a rank {rank}", hint="a `nodes: N` job has ranks 0 to N-1"
        )
    for job in jobs:
        offset = 0
        while True:
            job = state.job(job.id)
            if job.runner is None:
                if not follow or job.status not in ("pending", "waiting", "starting"):
                    break
                time.sleep(poll)
                continue
            runner = open_runner(state, job.runner)
            try:
                while data := runner.read_rank_log(job.id, rank, offset):
                    offset += len(data)
                    yield data
            finally:
                runner.close()
            if not follow or job.status not in ("pending", "waiting", "starting", "running"):
                break
            time.sleep(poll)
