"""Where dstack keeps its state: `$DSTACK_HOME` (default `~/.dstack`), mode 0700."""

from __future__ import annotations

import os
import stat
from pathlib import Path

_CHECKED: set[str] = set()
PRIVATE_FILES = ("state.sqlite", "known_hosts")


def home() -> Path:
    """The dstack home directory, created 0700 on first use; an existing one open to others is tightened."""
    path = Path(os.environ.get("DSTACK_HOME") or Path.home() / ".dstack").expanduser()
    if not path.is_dir():
        path.mkdir(parents=True, exist_ok=True)
        path.chmod(0o700)
    if str(path) not in _CHECKED:
        _CHECKED.add(str(path))
        _tighten(path)
    return path


def _tighten(path: Path) -> None:
    """Make the home 0700 and its state file 0600 if they are ours and others can read them."""
    for p, mode in ((path, 0o700), *((path / name, 0o600) for name in PRIVATE_FILES)):
        try:
            st = p.lstat()
            if st.st_uid == os.getuid() and not stat.S_ISLNK(st.st_mode) and st.st_mode & 0o077:
                p.chmod(stat.S_IMODE(st.st_mode) & ~0o077 | (mode & 0o700))
        except OSError:
            pass  # not there yet, or not ours: nothing to tighten


def sub(*parts: str) -> Path:
    """A folder under the dstack home, created on first use."""
    path = home().joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path
