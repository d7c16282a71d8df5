"""Placing a multi-node job on SSH hosts: N registered hosts that each fit it, reserved together, all or
none (a partial start would hang waiting for a rank); then started as one job (dstack.backends.gang)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from dstack.scheduler.placement import held_on, reserve, start, wanted
from dstack.store.reservation import RankHold, Reservation

if TYPE_CHECKING:
    from dstack.scheduler.loop import Orchestrator
    from dstack.scheduler.placement import Slot
    from dstack.specs import JobSpec
    from dstack.store.state import Job


def place_gang(
    orch: Orchestrator,
    job: Job,
    spec: JobSpec,
    slots: list[Slot],
    reasons: dict[str, str | None],
    upstream: list[Job],
) -> None:
    """Start the job's N ranks on N hosts with room for it now, or mark it waiting until N have room (or
    failed if fewer than N could ever fit it). This machine is never a rank: the others can't reach it."""
    from dstack.backends.gang import gang_name

    nodes = spec.resources.nodes
    hosts = [s for s in slots if s.name != "local" and not s.capacity.queued and _is_ssh(orch, s.name)]
    fitting = [s for s in hosts if reasons[s.name] is None]
    if len(fitting) < nodes:
        which = f": {', '.join(s.name for s in fitting)}" if fitting else ""
        why = f"nodes ({nodes} asked, {len(fitting)} registered SSH hosts fit the job{which})"
        others = [f"{n}: not enough {r}" for n, r in reasons.items() if r and n != "local"]
        orch.fail(job, "no runner could ever fit this job — " + "; ".join([why, *others]))
        return
    chosen: list[tuple[str, Reservation]] = []
    with orch.state.transaction():
        for slot in fitting:
            reserved = reserve(slot.capacity, held_on(orch.state, slot.name), spec)
            if reserved is not None:
                chosen.append((slot.name, reserved))
            if len(chosen) == nodes:
                break
        if len(chosen) == nodes:
            name = gang_name([host for host, _ in chosen])
            ranks = [RankHold(r.cpu, r.memory_mib, r.gpus, r.ports, runner=host) for host, r in chosen]
            first = chosen[0][1]
            held = Reservation(first.cpu, first.memory_mib, first.gpus, first.ports, ranks=ranks)
            orch.state.set_job(job.id, status="starting", runner=name, reserved=held)
    if len(chosen) < nodes:
        have = f"{len(chosen)} {'has' if len(chosen) == 1 else 'have'} that now"
        why = f"{nodes} hosts with {wanted(spec)} free are needed; {have}"
        if job.status != "waiting" or job.reason != why:
            orch.state.set_job(job.id, status="waiting", reason=why)
        return
    start(orch, job, spec, name, held, upstream)


def _is_ssh(orch: Orchestrator, name: str) -> bool:
    """Only plain SSH hosts take ranks (a cloud instance's idle reaper knows nothing of multi-node jobs)."""
    from dstack.store.hosts import get_host

    host = get_host(orch.state.db, name)
    return host is not None and host.kind == "ssh"
