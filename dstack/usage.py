"""What takes the space: kept runs' artifact bytes by workflow, tag or run, each object counted once."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from dstack.errors import UsageError

if TYPE_CHECKING:
    from dstack.store.objects import ObjectStore
    from dstack.store.state import State

GROUPINGS = ("workflow", "tag", "run")


@dataclass
class UsageRow:
    """One group: its files, its distinct bytes, and the bytes no other group shares (what deleting frees)."""

    name: str
    files: int = 0
    bytes: int = 0
    only_here: int = 0


@dataclass
class Usage:
    """Per-group rows; `unique_bytes` counts every object once overall, `logical_bytes` every file."""

    by: str
    rows: list[UsageRow] = field(default_factory=list)
    unique_bytes: int = 0
    logical_bytes: int = 0
    store_objects: int | None = None  # what the store holds, referenced or not (None: not listed)
    store_bytes: int | None = None


def disk_usage(state: State, by: str = "workflow", store: ObjectStore | None = None) -> Usage:
    """Kept runs' artifacts grouped `by` workflow, tag or run; with `store`, its totals too."""
    if by not in GROUPINGS:
        raise UsageError(f"--by: unknown grouping {by!r}", hint=f"use one of {', '.join(GROUPINGS)}")
    groups: dict[str, UsageRow] = {}
    digests_of: dict[str, dict[str, int]] = defaultdict(dict)
    holders: dict[str, set[str]] = defaultdict(set)
    sizes: dict[str, int] = {}
    usage = Usage(by)
    for run_name, workflow, tags, digest, size in state.usage_rows():
        name = {"workflow": workflow, "tag": tags or "(untagged)", "run": run_name}[by]
        row = groups.setdefault(name, UsageRow(name))
        row.files += 1
        usage.logical_bytes += size
        digests_of[name][digest] = size
        holders[digest].add(name)
        sizes[digest] = size
    for name, row in groups.items():
        row.bytes = sum(digests_of[name].values())
        row.only_here = sum(s for d, s in digests_of[name].items() if len(holders[d]) == 1)
    usage.unique_bytes = sum(sizes.values())
    usage.rows = sorted(groups.values(), key=lambda r: (-r.bytes, r.name))
    if store is not None:
        count = total = 0
        for o in store.list_objects():
            count, total = count + 1, total + o.size
        usage.store_objects, usage.store_bytes = count, total
    return usage
