"""Hardware metrics per job: a sampler shipped to runners, samples mirrored and kept compactly here.

`sampler.py` runs next to each job (started once by `run.sh`) and appends JSON lines to the job's
`metrics` file; `store` folds them into bounded per-job files under `$DSTACK_HOME/metrics/`; `summary`
turns those into current / peak / mean per series for `dstack metrics`, `dstack hosts` and the dashboard.
"""

from __future__ import annotations

from pathlib import Path


def sampler_source() -> str:
    """The sampler script's text, as written next to each job."""
    return (Path(__file__).with_name("sampler.py")).read_text()
