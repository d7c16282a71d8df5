"""scripts/bench rows for `dstack ui`: start → first page, and the runs page's first paint at 1,000 runs."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def fill_state(home: Path, count: int) -> None:
    """`count` finished runs (one job each) in the state under `home`, as the dashboard's load to show."""
    env_home = os.environ.get("DSTACK_HOME")
    os.environ["DSTACK_HOME"] = str(home)
    try:
        from dstack.store.state import Job, Run, open_state

        with open_state() as state:
            now = time.time()
            for i in range(count):
                run = Run(
                    id=f"bench{i:05d}",
                    name=f"bench-run-{i}",
                    workflow=("prepare", "train", "evaluate")[i % 3],
                    status=("done", "failed", "done", "stopped")[i % 4],
                    branch="main",
                    commit_sha=f"{i:040x}",
                    created_at=now - i * 60,
                    finished_at=now - i * 60 + 30,
                )
                job = Job(id=f"bench{i:05d}-job", run_id=run.id, workflow=run.workflow, status=run.status)
                state.insert_run(run, [job])
    finally:
        if env_home is None:
            os.environ.pop("DSTACK_HOME", None)
        else:
            os.environ["DSTACK_HOME"] = env_home


def start_ui(python: str, env: dict[str, str], cwd: Path) -> tuple[subprocess.Popen[str], str]:
    """`dstack ui --no-open` in the background and the URL it printed."""
    proc = subprocess.Popen(
        [python, "-m", "dstack", "ui", "--no-open"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
        text=True,
        cwd=cwd,
        env=env,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith("dstack ui: "):
        proc.kill()
        proc.wait()
        raise RuntimeError(f"`dstack ui` printed {line!r}")
    return proc, line.split(": ", 1)[1].strip()


def stop_ui(proc: subprocess.Popen[str]) -> None:
    proc.terminate()
    proc.wait(timeout=10)
    if proc.stdout:
        proc.stdout.close()


def ui_first_page(python: str, env: dict[str, str], cwd: Path) -> Callable[[], float]:
    """Time from starting `dstack ui` to its first page (the runs page's HTML) answered."""

    def timed() -> float:
        start = time.perf_counter()
        proc, url = start_ui(python, env, cwd)
        try:
            with urllib.request.urlopen(url, timeout=30) as resp:
                resp.read()
            return time.perf_counter() - start
        finally:
            stop_ui(proc)

    return timed


def runs_page_first_paint(python: str, env: dict[str, str], workdir: Path, stack: Any) -> Callable[[], float]:
    """The runs page with 1,000 runs: from navigation to the table drawn, as headless chromium reports it."""
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        raise RuntimeError("chromium is not installed (apt-get install -y chromium)")
    home = workdir / "ui-1000-home"
    if not home.exists():
        fill_state(home, 1000)
    proc, url = start_ui(python, {**env, "DSTACK_HOME": str(home)}, workdir)
    stack.callback(stop_ui, proc)

    def timed() -> float:
        with tempfile.TemporaryDirectory(prefix="dstack-chromium-") as profile:
            out = subprocess.run(
                [exe, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--virtual-time-budget=3000"]
                + ["--dump-dom", url],
                capture_output=True,
                text=True,
                timeout=60,
            ).stdout
        found = re.search(r'data-first-paint-ms="(\d+)"', out)
        if not found or out.count("bench-run-") < 1000:
            raise RuntimeError("the runs page did not draw 1,000 runs")
        return int(found.group(1)) / 1000

    return timed


if __name__ == "__main__":  # quick look: python scripts/bench_ui.py
    with tempfile.TemporaryDirectory() as tmp:
        from contextlib import ExitStack

        with ExitStack() as stack:
            env = {**os.environ, "DSTACK_HOME": str(Path(tmp) / "home")}
            print(f"start → first page: {ui_first_page(sys.executable, env, Path(tmp))():.3f}s")
            paint = runs_page_first_paint(sys.executable, env, Path(tmp), stack)
            print(f"runs page, 1,000 runs, first paint: {paint():.3f}s")
