"""Which workflows are broken, remembered per state of `.dstack/` (like Git's index: path, size, mtime), so
`dstack run --help` lists and marks them without importing the models again."""

from __future__ import annotations

import hashlib
import json
import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dstack.workflows.project import Project


def _fingerprint(project: Project) -> str:
    from dstack import __version__

    h = hashlib.sha256(__version__.encode())
    folder = project.root / ".dstack"
    for dirpath, _, files in sorted(os.walk(folder)):
        for name in sorted(files):
            path = os.path.join(dirpath, name)
            try:
                st = os.stat(path)
            except OSError:
                continue
            h.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ino}\n".encode())
    return h.hexdigest()[:32]


def workflow_problems(project: Project) -> dict[str, str | None]:
    """Each workflow's error message (None if it reads fine), from the cache when `.dstack/` is unchanged."""
    from dstack.home import sub

    path = sub("cache") / f"workflows-{_fingerprint(project)}.json"
    try:
        cached: dict[str, str | None] = json.loads(path.read_text())
        if list(cached) == project.names():
            return cached
    except (OSError, ValueError):
        pass
    result = {}
    for name in project.names():
        error = project.error(name)
        result[name] = str(error) if error else None
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(result))
        os.replace(tmp, path)
    except OSError:
        pass
    return result
