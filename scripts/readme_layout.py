#!/usr/bin/env python3
"""Check that README's "Layout" list names every module of dstack/ once, and no module that is gone."""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    listed = re.findall(r"^- `(dstack/[^`]+\.py)`:", (ROOT / "README.md").read_text(), re.MULTILINE)
    modules = sorted(str(p.relative_to(ROOT)) for p in ROOT.joinpath("dstack").rglob("*.py"))
    missing = [m for m in modules if m not in listed]
    gone = [m for m in listed if m not in modules]
    twice = sorted({m for m in listed if listed.count(m) > 1})
    for what, names in (("not in README's Layout", missing), ("in README but gone", gone), ("twice", twice)):
        for name in names:
            print(f"{name}: {what}")
    return 1 if missing or gone or twice else 0


if __name__ == "__main__":
    sys.exit(main())
