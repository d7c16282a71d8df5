"""Per-job metrics under `$DSTACK_HOME/metrics/`: `<job>.jsonl` (points) and `<job>.json` (totals).

Samples arrive as the sampler's JSON lines; each becomes one flat point (`cpu`, `mem`, `rd`, `wr`,
`gpu0.util`, …). A job keeps at most MAX_POINTS points: past that, neighbouring pairs are merged (their
mean), so a long job's file stays small while its totals (peak, mean, last) stay exact.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

MAX_POINTS = int(os.environ.get("DSTACK_METRICS_MAX_POINTS", "720"))
GPU_FIELDS = ("util", "mem", "memt", "power", "temp")


@dataclass
class Series:
    """Totals of one series over every sample (not only the kept points)."""

    last: float = 0.0
    peak: float = 0.0
    total: float = 0.0
    count: int = 0

    @property
    def mean(self) -> float:
        return self.total / self.count if self.count else 0.0

    def add(self, value: float) -> None:
        self.last = value
        self.peak = max(self.peak, value) if self.count else value
        self.total += value
        self.count += 1


@dataclass
class Totals:
    """What `<job>.json` holds: how far the runner's file was read, and each series' totals."""

    offset: int = 0
    samples: int = 0
    points: int = 0  # points kept in `<job>.jsonl`
    mem_peak: int = 0  # the container's own high-water mark where its cgroup keeps one
    first_t: float = 0.0
    last_t: float = 0.0
    source: str = "processes"  # or "docker": the container's own figures
    limit: int = 0  # the memory limit the job ran under (its container's or cgroup's), 0 if none
    oom_first: int | None = None  # the cgroup's OOM-kill count at the first and last sample
    oom_last: int | None = None
    host: list[float] = field(default_factory=list)  # [cpu %, memory used, memory total, cpus] last seen
    series: dict[str, Series] = field(default_factory=dict)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Totals:
        data = dict(data)
        data["series"] = {k: Series(**v) for k, v in data.get("series", {}).items()}
        return cls(**data)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def metrics_dir() -> Path:
    from dstack.home import sub

    return sub("metrics")


def _safe(job_id: str) -> str:
    if not job_id or "/" in job_id or job_id.startswith("."):
        raise ValueError(f"bad job id {job_id!r}")
    return job_id


def totals_path(job_id: str) -> Path:
    return metrics_dir() / f"{_safe(job_id)}.json"


def points_path(job_id: str) -> Path:
    return metrics_dir() / f"{_safe(job_id)}.jsonl"


def load_totals(job_id: str) -> Totals | None:
    """The job's totals, or None if it has no samples."""
    try:
        return Totals.from_json(json.loads(totals_path(job_id).read_text()))
    except (OSError, ValueError, TypeError):
        return None


def load_points(job_id: str) -> list[dict[str, float]]:
    """The job's kept points, oldest first (each has `t` and one value per series)."""
    try:
        text = points_path(job_id).read_text()
    except OSError:
        return []
    points = []
    for line in text.splitlines():
        try:
            points.append(json.loads(line))
        except ValueError:
            continue  # a line cut by a crash
    return points


def flatten(sample: dict[str, Any]) -> dict[str, float]:
    """One sampler line as a flat point: `t`, `cpu`, `mem`, `rd`, `wr`, `gpu<i>.<field>`."""
    point: dict[str, float] = {"t": float(sample["t"])}
    for key in ("cpu", "mem", "rd", "wr"):
        value = sample.get(key)
        if isinstance(value, (int, float)):
            point[key] = value
    for row in sample.get("gpu") or []:
        if not row or row[0] is None:
            continue
        index = int(row[0])
        for name, value in zip(GPU_FIELDS, row[1:], strict=False):
            if value is not None:
                point[f"gpu{index}.{name}"] = value
    return point


def parse_lines(data: bytes) -> tuple[list[dict[str, Any]], int]:
    """The complete JSON lines in `data` and how many bytes they took (a partial last line waits)."""
    end = data.rfind(b"\n") + 1
    samples = []
    for line in data[:end].splitlines():
        try:
            sample = json.loads(line)
        except ValueError:
            continue
        if isinstance(sample, dict) and isinstance(sample.get("t"), (int, float)):
            samples.append(sample)
    return samples, end


def merge_pairs(points: list[dict[str, float]]) -> list[dict[str, float]]:
    """Half as many points: each neighbouring pair becomes its mean (an odd last point stays)."""
    merged = []
    for i in range(0, len(points) - 1, 2):
        a, b = points[i], points[i + 1]
        point = {}
        for key in a.keys() | b.keys():
            values = [p[key] for p in (a, b) if key in p]
            point[key] = round(sum(values) / len(values), 2)
        merged.append(point)
    if len(points) % 2:
        merged.append(points[-1])
    return merged


def ingest(job_id: str, data: bytes) -> int:
    """Fold new sampler output (read from the runner's file at the saved offset) into the job's files;
    returns how many bytes were consumed."""
    totals = load_totals(job_id) or Totals()
    samples, used = parse_lines(data)
    if not used:
        return 0
    for marker in [s for s in samples if s.get("oomkilled")]:  # written by a container job on OOMKilled
        totals.oom_first = totals.oom_first or 0
        totals.oom_last = max(totals.oom_last or 0, totals.oom_first) + 1
        samples.remove(marker)
    points = [flatten(s) for s in samples]
    for sample, point in zip(samples, points, strict=True):
        if not totals.samples:
            totals.first_t = point["t"]
        totals.samples += 1
        totals.last_t = point["t"]
        if sample.get("src"):
            totals.source = str(sample["src"])
        if isinstance(sample.get("lim"), int) and (sample["lim"] or totals.source != "docker"):
            totals.limit = sample["lim"]
        if isinstance(sample.get("oom"), int):
            if totals.oom_first is None:
                totals.oom_first = sample["oom"]
            totals.oom_last = sample["oom"]
        if isinstance(sample.get("peak"), int):
            totals.mem_peak = max(totals.mem_peak, sample["peak"])
        if isinstance(sample.get("host"), list):
            totals.host = sample["host"]
        for key, value in point.items():
            if key != "t":
                totals.series.setdefault(key, Series()).add(float(value))
    totals.offset += used
    path = points_path(job_id)
    with open(path, "a") as f:
        f.writelines(json.dumps(p, separators=(",", ":")) + "\n" for p in points)
    totals.points += len(points)
    if totals.points > MAX_POINTS:  # halve: the file grows back to MAX_POINTS before the next merge
        kept = load_points(job_id)
        while len(kept) > MAX_POINTS // 2:
            kept = merge_pairs(kept)
        totals.points = len(kept)
        _write_atomic(path, "".join(json.dumps(p, separators=(",", ":")) + "\n" for p in kept))
    _write_atomic(totals_path(job_id), json.dumps(totals.to_json(), separators=(",", ":")))
    return used


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
