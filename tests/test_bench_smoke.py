"""scripts/bench keeps working: its cheap rows run on this checkout and compare with their peer."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_bench_quick_rows_measure_dstack_next_to_python():
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench"), "-n", "1", "--json", "--no-install"]
        + ["-k", "python -c pass", "-k", "dstack --help", "-k", "dstack runs"],
        capture_output=True,
        text=True,
        timeout=90,
        stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = {r["name"]: r for r in json.loads(proc.stdout)["rows"]}
    assert set(rows) == {"`python -c pass`", "`dstack --help`", "`dstack runs` (empty state)"}
    assert all(r["error"] is None and r["runs"] == 1 for r in rows.values()), rows
    assert rows["`dstack --help`"]["vs_peer_note"].endswith("ms over `python -c pass`")


def test_bench_without_dvc_and_no_install_says_the_command(tmp_path):
    """A row whose tool is missing fails alone, with the one command that installs it."""
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import importlib.machinery
        import importlib.util

        loader = importlib.machinery.SourceFileLoader("bench", str(ROOT / "scripts" / "bench"))
        spec = importlib.util.spec_from_loader("bench", loader)
        assert spec is not None
        bench = importlib.util.module_from_spec(spec)
        sys.modules["bench"] = bench  # its dataclasses look their module up
        loader.exec_module(bench)
    finally:
        sys.path.remove(str(ROOT / "scripts"))
        sys.modules.pop("bench", None)
    bench.DVC_VENV = tmp_path / "no-dvc"
    try:
        bench.ensure_dvc(install=False)
    except bench.BenchError as e:
        assert "pip install 'dvc>=3,<4'" in str(e)
    else:
        raise AssertionError("ensure_dvc(install=False) found a DVC that is not there")
