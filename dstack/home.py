"""Where dstack keeps its state: `$DSTACK_HOME` (default `~/.dstack`), mode 0700."""

from __future__ import annotations

import os
from pathlib import Path


def home() -> Path:
    """The dstack home directory, created 0700 on first use."""
    path = Path(os.environ.get("DSTACK_HOME") or Path.home() / ".dstack").expanduser()
    if not path.is_dir():
        path.mkdir(parents=True, exist_ok=True)
        path.chmod(0o700)
    return path


def sub(*parts: str) -> Path:
    """A folder under the dstack home, created on first use."""
    path = home().joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path
