"""Placement: which runner takes a job, by the resources it declares and what runners have free; and the
job's start there (or a launch by a capacity source when nothing fits)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from dstack.errors import DstackError
from dstack.scheduler.watching import keep_earlier_logs, log_of

if TYPE_CHECKING:
    from dstack.backends.base import Capacity
    from dstack.scheduler.loop import Orchestrator
    from dstack.specs import JobSpec
    from dstack.store.state import Job, State


@dataclass
class Slot:
    """A runner that may take jobs, with what it has in total."""

    name: str
    capacity: Capacity


def local_enabled(state: State) -> bool:
    return state.setting("local.enabled") != "0"


def available_slots(state: State, local_capacity: Capacity | None) -> list[Slot]:
    """Enabled runners that answered at their last check."""
    from dstack.store.hosts import ready_capacities

    slots = []
    if local_enabled(state) and local_capacity is not None:
        slots.append(Slot("local", local_capacity))
    slots += [Slot(name, capacity) for name, capacity in ready_capacities(state.db)]
    return slots


def cpu_request(spec: JobSpec) -> float:
    return spec.resources.cpu if spec.resources.cpu is not None else 1.0


def gpu_matches(gpu_name: str, wanted: str | None) -> bool:
    """`v100` matches 'Tesla V100-SXM2-16GB'; names compare case-insensitively on the product name."""
    if not wanted:
        return True
    return wanted.lower().replace(" ", "") in gpu_name.lower().replace(" ", "")


def shortfall(cap: Capacity, spec: JobSpec) -> str | None:
    """Why this runner could never run the job (None if it could, once free)."""
    if cap.queued:
        return _cluster_shortfall(cap, spec)
    res = spec.resources
    if spec.image and not cap.docker:
        return f"Docker (the job runs image {spec.image})"
    if cpu_request(spec) > cap.cpus:
        return f"CPUs ({cpu_request(spec):g} asked, {cap.cpus:g} there)"
    if res.memory_mib and res.memory_mib > cap.memory_mib:
        return f"memory ({res.memory_mib} MiB asked, {cap.memory_mib} MiB there)"
    if res.disk_mib and cap.disk_free_mib and res.disk_mib > cap.disk_free_mib:
        return f"disk ({res.disk_mib} MiB asked, {cap.disk_free_mib} MiB free)"
    if res.gpu.count:
        gpus = [
            g
            for g in cap.gpus
            if gpu_matches(g.name, res.gpu.name)
            and (not res.gpu.memory_mib or g.memory_mib >= res.gpu.memory_mib)
        ]
        if len(gpus) < res.gpu.count:
            what = f"{res.gpu.name} " if res.gpu.name else ""
            return f"GPUs ({res.gpu.count} {what}asked, {len(gpus)} there)"
    return None


def _cluster_shortfall(cap: Capacity, spec: JobSpec) -> str | None:
    """A cluster fits a job when one of its partitions does: `nodes` of its nodes each fit the job."""
    if spec.image and not cap.docker:
        return f"Docker (the job runs image {spec.image})"
    if cap.queued:  # the cluster: some partition
        whys = [_cluster_shortfall(p, spec) for p in cap.parts]
        if any(why is None for why in whys) or not whys:
            return None if whys else "partitions (none is up)"
        closest = max(range(len(whys)), key=lambda i: (_fitting(cap.parts[i], spec), _size(cap.parts[i])))
        return whys[closest]
    fit = _fitting(cap, spec)
    if fit >= max(1, spec.resources.nodes):
        return None
    if fit:
        return f"nodes ({spec.resources.nodes} asked, {fit} that fit the job there)"
    if not cap.parts:
        return "nodes (none there)"
    biggest = max(cap.parts, key=_size)
    return shortfall(biggest, spec) or f"nodes ({spec.resources.nodes} asked, none fit the job there)"


def _fitting(partition: Capacity, spec: JobSpec) -> int:
    return sum(1 for node in partition.parts if shortfall(node, spec) is None)


def _size(cap: Capacity) -> tuple[int, float, int]:
    """How big a node (or a partition's biggest node) is, GPUs first."""
    if cap.parts:
        return max(_size(p) for p in cap.parts)
    return (len(cap.gpus), cap.cpus, cap.memory_mib)


def reserve(cap: Capacity, held: list[dict[str, Any]], spec: JobSpec) -> dict[str, Any] | None:
    """What the job would hold on this runner now, or None if too much is taken."""
    if cap.queued:
        return {}  # the runner's own scheduler (Slurm) queues it: never second-guessed here
    res = spec.resources
    cpu = cpu_request(spec)
    used_cpu = sum(h.get("cpu", 0) for h in held)
    used_mem = sum(h.get("memory_mib", 0) for h in held)
    used_gpus = {i for h in held for i in h.get("gpus", [])}
    if set(spec.ports.fixed) & {int(p) for h in held for p in h.get("ports", [])}:
        return None  # a fixed port another job holds: wait for it
    if used_cpu + cpu > cap.cpus + 1e-9:
        return None
    if res.memory_mib and used_mem + res.memory_mib > cap.memory_mib:
        return None
    gpus: list[int] = []
    if res.gpu.count:
        free = [
            g.index
            for g in cap.gpus
            if g.index not in used_gpus
            and gpu_matches(g.name, res.gpu.name)
            and (not res.gpu.memory_mib or g.memory_mib >= res.gpu.memory_mib)
        ]
        if len(free) < res.gpu.count:
            return None
        gpus = free[: res.gpu.count]
    reserved: dict[str, Any] = {"cpu": cpu, "memory_mib": res.memory_mib or 0, "gpus": gpus}
    if spec.ports.fixed:
        reserved["ports"] = list(spec.ports.fixed)
    return reserved


def place(orch: Orchestrator, job: Job, upstream: list[Job]) -> None:
    """Start the job on a runner with room for it, or mark it waiting (or failed if none ever fits)."""
    from dstack.spec_view import spec_view

    spec = spec_view(job.spec)  # JobSpec's fields without pydantic (the local run path imports none)
    if spec.image and not orch.docker_asked:
        from dstack.backends.local import docker_answers

        orch.local_capacity.docker, orch.docker_asked = docker_answers(), True
    if spec.resources.gpu.count and not orch.gpus_asked:
        from dstack.backends.local import local_gpus

        orch.local_capacity.gpus, orch.gpus_asked = local_gpus(), True
    slots = available_slots(orch.state, orch.local_capacity)
    pin = orch.run.host_pin or ("local" if spec.resources.local else None)
    if pin:
        slots = [s for s in slots if s.name == pin]
        if not slots:
            orch.fail(job, f"runner '{pin}' is not available (disabled, unreachable or removed)")
            return
    reasons = {s.name: shortfall(s.capacity, spec) for s in slots}
    fitting = [s for s in slots if reasons[s.name] is None]
    if not fitting:
        why = "; ".join(f"{n}: not enough {r}" for n, r in reasons.items()) or "no runner is enabled"
        from dstack.capacity import configured_sources

        for source in [] if pin else configured_sources(orch.state):
            try:
                launched = source.launch(orch.state, spec)
            except DstackError as e:
                orch.fail(job, f"no runner fits this job and launching one failed: {e}")
                return
            if launched is not None:
                orch.state.set_job(job.id, status="waiting", reason=f"launched {launched} for it")
                return
            why += f"; {source.kind}: {source.why_not(orch.state, spec)}"
        orch.fail(job, f"no runner could ever fit this job — {why}")
        return
    chosen = None
    with orch.state.transaction():
        for slot in fitting:
            held = orch.state.reservations(slot.name)
            reserved = reserve(slot.capacity, held, spec)
            if reserved is not None:
                chosen = slot
                orch.state.set_job(job.id, status="starting", runner=slot.name, reserved=reserved)
                break
    if chosen is None:
        if job.status != "waiting":
            orch.state.set_job(job.id, status="waiting", reason="no runner has " + _wants(spec) + " free now")
        return
    start(orch, job, spec, chosen.name, reserved or {}, upstream)


def start(
    orch: Orchestrator, job: Job, spec: Any, runner_name: str, reserved: dict[str, Any], upstream: list[Job]
) -> None:
    from dstack.backends.base import DependencyArtifacts, JobContext
    from dstack.graph import load_manifest

    deps = []
    for up in upstream:
        deps.append(DependencyArtifacts(up.workflow, load_manifest(orch.store, up.manifest)))
    from dstack.ports import choose_ports

    try:
        ports = choose_ports(orch.state, orch.runner(runner_name), job.id, spec)
    except DstackError as e:
        orch.fail(job, f"could not start on {runner_name}: {e}")
        return
    ctx = JobContext(
        job_id=job.id,
        run_name=orch.run.name,
        spec=spec,
        code=orch.code,
        working_subdir=orch.run.working_subdir,
        dependencies=deps,
        store=orch.store,
        gpu_indexes=list(reserved.get("gpus", [])),
        ports=ports,
        repo=orch.run.repo_root,
    )
    runner = orch.runner(runner_name)
    job.runner = runner_name
    local_log = log_of(orch, job)
    keep_earlier_logs(orch, job, local_log)
    try:
        runner.start_job(ctx)
    except (DstackError, OSError) as e:  # OSError: e.g. no space left for the job's files
        orch.fail(job, f"could not start on {runner_name}: {e}")
        return
    if not orch.state.transition(
        job.id, ("starting",), status="running", started_at=time.time(), reason=None, log_path=local_log
    ):
        runner.stop_job(job.id)  # stopped while it was starting
        runner.cleanup_job(job.id, keep=orch.run.keep)


def _wants(spec: Any) -> str:
    res = spec.resources
    parts = [f"{res.cpu or 1:g} CPU"]
    if res.memory_mib:
        parts.append(f"{res.memory_mib} MiB memory")
    if res.gpu.count:
        parts.append(f"{res.gpu.count} {res.gpu.name or ''} GPU".replace("  ", " "))
    return ", ".join(parts)
