"""Current, peak and mean per series for a run's jobs and for hosts (what the CLI and dashboard show)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dstack.store.state import Job, State

SPARKS = "▁▂▃▄▅▆▇█"
LABELS = {"cpu": "CPU %", "mem": "memory", "rd": "disk read/s", "wr": "disk write/s"}
GPU_LABELS = {"util": "util %", "mem": "memory MiB", "power": "power W", "temp": "temp °C"}
FRESH_S = 60.0  # a host's figures older than this (no running job sampled it) are not "current"


@dataclass
class SeriesSummary:
    name: str
    label: str
    current: float
    peak: float
    mean: float
    points: list[float] = field(default_factory=list)
    unit: str = ""  # "bytes", "bytes/s", "%" or ""


@dataclass
class JobMetrics:
    job_id: str
    workflow: str
    status: str
    runner: str | None
    source: str
    samples: int
    first_t: float
    last_t: float
    limit: int
    series: list[SeriesSummary]
    times: list[float] = field(default_factory=list)
    gpu_memory_total: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "job_id": self.job_id,
            "workflow": self.workflow,
            "status": self.status,
            "runner": self.runner,
            "source": self.source,
            "samples": self.samples,
            "first_t": self.first_t,
            "last_t": self.last_t,
            "memory_limit": self.limit,
            "gpu_memory_total_mib": self.gpu_memory_total,
            "times": self.times,
            "series": {
                s.name: {
                    "label": s.label,
                    "unit": s.unit,
                    "current": s.current,
                    "peak": s.peak,
                    "mean": round(s.mean, 2),
                    "points": s.points,
                }
                for s in self.series
            },
        }


def job_metrics(job: Job) -> JobMetrics:
    """One job's summary: every series with its current, peak and mean, and its kept points."""
    from dstack.metrics.store import Totals, load_points, load_totals

    totals = load_totals(job.id) or Totals()
    points = load_points(job.id)
    series = []
    gpu_total: dict[str, float] = {}
    for name in sorted(totals.series, key=_order):
        s = totals.series[name]
        if name.endswith(".memt"):
            gpu_total[name.split(".")[0]] = s.last
            continue
        peak = max(s.peak, totals.mem_peak) if name == "mem" else s.peak
        series.append(
            SeriesSummary(
                name=name,
                label=_label(name),
                current=s.last,
                peak=peak,
                mean=s.mean,
                points=[p[name] for p in points if name in p],
                unit=_unit(name),
            )
        )
    return JobMetrics(
        job_id=job.id,
        workflow=job.workflow,
        status=job.status,
        runner=job.runner,
        source=totals.source,
        samples=totals.samples,
        first_t=totals.first_t,
        last_t=totals.last_t,
        limit=totals.limit,
        series=series,
        times=[p["t"] for p in points],
        gpu_memory_total=gpu_total,
    )


def run_metrics(state: State, run_ref: str, job_ref: str | None = None) -> list[JobMetrics]:
    """The metrics of a run's jobs (or of one, by workflow name or job id)."""
    from dstack.errors import NotFoundError

    run = state.run(run_ref)
    jobs = state.jobs(run.id)
    if job_ref:
        jobs = [j for j in jobs if job_ref in (j.workflow, j.id)]
        if not jobs:
            raise NotFoundError(f"run {run.name} has no job '{job_ref}' — see `dstack runs {run.name}`")
    return [job_metrics(j) for j in jobs]


@dataclass
class HostUsage:
    """A runner's utilization now, from the latest sample of a job running on it."""

    cpu_percent: float | None = None
    memory_used: int | None = None
    memory_total: int | None = None
    gpu_util: float | None = None
    sampled_at: float | None = None

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def host_usage(state: State) -> dict[str, HostUsage]:
    """Each runner with a job running now: its host-wide CPU and memory use and its jobs' GPU use."""
    from dstack.metrics.store import load_totals

    usage: dict[str, HostUsage] = {}
    gpus: dict[str, dict[str, float]] = {}
    now = time.time()
    for job in state.jobs(statuses=("running",)):
        totals = load_totals(job.id)
        if totals is None or now - totals.last_t > FRESH_S:
            continue
        name = job.runner or "local"
        u = usage.setdefault(name, HostUsage())
        if len(totals.host) >= 3 and (u.sampled_at or 0) <= totals.last_t:
            u.cpu_percent, u.memory_used, u.memory_total = (
                totals.host[0],
                int(totals.host[1]),
                int(totals.host[2]),
            )
            u.sampled_at = totals.last_t
        for key, s in totals.series.items():
            if key.endswith(".util"):
                gpus.setdefault(name, {})[key] = s.last
    for name, values in gpus.items():
        usage[name].gpu_util = round(sum(values.values()) / len(values), 1)
    return usage


def sparkline(values: list[float], width: int = 30) -> str:
    """Values as a row of block characters, resampled to `width` (each cell the mean of its slice)."""
    if not values:
        return ""
    if len(values) > width:
        step = len(values) / width
        values = [
            sum(chunk) / len(chunk)
            for chunk in (
                values[int(i * step) : max(int((i + 1) * step), int(i * step) + 1)] for i in range(width)
            )
        ]
    low, high = min(values), max(values)
    span = high - low
    return "".join(SPARKS[int((v - low) / span * (len(SPARKS) - 1)) if span else 0] for v in values)


def human_bytes(n: float) -> str:
    """1.5 GiB, 312 MiB, 20 KiB."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit in ("B", "KiB") else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


def format_value(value: float, unit: str) -> str:
    if unit == "bytes":
        return human_bytes(value)
    if unit == "bytes/s":
        return human_bytes(value) + "/s"
    return f"{value:.1f}" if value % 1 else f"{value:.0f}"


def _order(name: str) -> tuple[int, str]:
    base = ["cpu", "mem", "rd", "wr"]
    return (base.index(name), name) if name in base else (len(base), name)


def _label(name: str) -> str:
    if name in LABELS:
        return LABELS[name]
    gpu, _, what = name.partition(".")
    return f"{gpu.upper()} {GPU_LABELS.get(what, what)}"


def _unit(name: str) -> str:
    if name == "mem":
        return "bytes"
    if name in ("rd", "wr"):
        return "bytes/s"
    if name == "cpu" or name.endswith(".util"):
        return "%"
    return ""
