"""Placing jobs on runners by the resources they declare and what runners have free."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dstack.backends.base import Capacity
    from dstack.specs import JobSpec


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
