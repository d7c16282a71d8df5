"""Quoting a value for `export K=…` in a job's env.sh (no YAML or pydantic here: every job start uses it)."""

from __future__ import annotations

import re

ENV_REF = re.compile(r"\$(?:\{([A-Za-z_][A-Za-z0-9_]*)\}|([A-Za-z_][A-Za-z0-9_]*))")


def quote_env_value(value: str) -> str:
    """`value` double-quoted for `export K=…` so bash expands only `$NAME`/`${NAME}` in it (no `$(…)`,
    backticks or other expansions): `$PATH:src` → `"$PATH:src"`, `$(rm -rf /)` → `"\\$(rm -rf /)"`."""
    out, pos = ['"'], 0
    for m in ENV_REF.finditer(value):
        out.append(escape_dq(value[pos : m.start()]))
        out.append("${" + (m.group(1) or m.group(2)) + "}")
        pos = m.end()
    out.append(escape_dq(value[pos:]))
    out.append('"')
    return "".join(out)


def escape_dq(text: str) -> str:
    return "".join("\\" + c if c in '\\"`$' else c for c in text)
