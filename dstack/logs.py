"""Following a run: its jobs' output and status changes, from the start or as they come."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

from dstack.orchestrator import orchestrator_alive, start_orchestrator
from dstack.store.state import ACTIVE_RUN, State


@dataclass
class LogEvent:
    """A line of a job's output, or a change of a job's status."""

    workflow: str
    job_id: str
    text: str
    kind: str = "log"  # "log" | "status"


def follow_run(state: State, run_id: str, follow: bool = True, poll: float = 0.05) -> Iterator[LogEvent]:
    """Yield the run's output (and status changes) from the start; with `follow`, until the run ends."""
    offsets: dict[str, int] = {}
    partial: dict[str, bytes] = {}
    seen: dict[str, str] = {}
    while True:
        run = state.run(run_id)
        done = run.status not in ACTIVE_RUN
        if not done and follow and not orchestrator_alive(run) and run.orchestrator_pid is not None:
            start_orchestrator(state, run)
        for job in state.jobs(run_id):
            label = job.status if not job.reason else f"{job.status}: {job.reason}"
            if seen.get(job.id) != label:
                seen[job.id] = label
                yield LogEvent(job.workflow, job.id, label, "status")
            if not job.log_path:
                continue
            try:
                with open(job.log_path, "rb") as f:
                    f.seek(offsets.get(job.id, 0))
                    data = f.read()
            except FileNotFoundError:
                continue
            if not data:
                continue
            offsets[job.id] = offsets.get(job.id, 0) + len(data)
            data = partial.pop(job.id, b"") + data
            lines = data.split(b"\n")
            if lines[-1]:
                partial[job.id] = lines[-1]
            for line in lines[:-1]:
                yield LogEvent(job.workflow, job.id, line.decode(errors="replace"))
        if done or not follow:
            for job_id, rest in partial.items():
                job = state.job(job_id)
                yield LogEvent(job.workflow, job_id, rest.decode(errors="replace"))
            return
        time.sleep(poll)


def follow_rank(
    state: State, run_id: str, rank: int, follow: bool = True, poll: float = 0.5
) -> Iterator[bytes]:
    """Rank `rank`'s output of the run's multi-node jobs, read from their runner; `follow`: to the end."""
    from dstack.errors import UsageError
    from dstack.runners import open_runner
    from dstack.specs import JobSpec

    run = state.run(run_id)
    jobs = [j for j in state.jobs(run_id) if JobSpec.model_validate(j.spec).resources.nodes > rank]
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
