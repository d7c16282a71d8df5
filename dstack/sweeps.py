"""Sweeps: `dstack run train --lr 0.1,0.01 --batch 32,64` runs the grid, one job per combination."""

from __future__ import annotations

import itertools
import re

_SPLIT = re.compile(r"(?<!\\),")


def split_values(value: str) -> list[str]:
    """`0.1,0.01` → two values; `a\\,b` keeps its comma."""
    return [v.replace("\\,", ",") for v in _SPLIT.split(value)]


def expand_grid(overrides: dict[str, str]) -> list[dict[str, str]]:
    """Every combination of the comma-separated values, in the order given."""
    names = list(overrides)
    choices = [split_values(overrides[n]) for n in names]
    return [dict(zip(names, combo, strict=True)) for combo in itertools.product(*choices)]
