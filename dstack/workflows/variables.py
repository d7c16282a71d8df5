"""Variables: reading `variables.yaml`/`configs.yaml`, and `${{ var }}` substitution that never leaves a
value unquoted in a shell line."""

from __future__ import annotations

import re
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from dstack.errors import ConfigError
from dstack.workflows.yamlfile import YMap, scalar_text

RESERVED_IN_SHELL = {"run_name": '"$RUN_NAME"', "job_id": '"$JOB_ID"'}
ARGS_NAMES = ("config_args", "variables_as_args")
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_EXPR = r"\$\{\{(?P<expr>.*?)\}\}"
_PLAIN = re.compile(_EXPR)
_SHELL = re.compile(
    _EXPR + r"|\$\{(?P<braced>config_args|variables_as_args)\}"
    r"|\$(?P<bare>config_args|variables_as_args)(?![A-Za-z0-9_])"
)
_ENV_REF = re.compile(r"\$(?:\{([A-Za-z_][A-Za-z0-9_]*)\}|([A-Za-z_][A-Za-z0-9_]*))")


def is_identifier(name: str) -> bool:
    """A variable or environment name: letters, digits and `_`, not starting with a digit."""
    return bool(_IDENT.match(name))


def config_args(variables: Mapping[str, str]) -> str:
    """`--name 'value' …` for every variable, each value shell-quoted."""
    return " ".join(f"--{name} {shlex.quote(value)}" for name, value in variables.items())


@dataclass
class Substituter:
    """Substitutes `${{ … }}` for one workflow: `shell()` for shell lines, `plain()` for other fields."""

    variables: dict[str, str]
    args: list[str] = field(default_factory=list)
    file: str | None = None

    def plain(self, text: str, where: str, line: int | None) -> str:
        """Values as plain text; `${{ run_name }}`/`${{ job_id }}` are left for job creation."""
        return _PLAIN.sub(lambda m: self._plain_value(m, where, line), text)

    def shell(self, text: str, where: str, line: int | None) -> str:
        """Values shell-quoted; reserved names become references to the runner's environment."""
        return _SHELL.sub(lambda m: self._shell_value(m, where, line), text)

    def _name(self, match: re.Match[str], where: str, line: int | None) -> str:
        name = match.group("expr").strip()
        if name in self.variables or name in RESERVED_IN_SHELL or name in ARGS_NAMES or name == "run.args":
            return name
        known = ", ".join(self.variables) or "none"
        raise ConfigError(
            f"unknown variable '{name}' in '{where}'",
            file=self.file,
            line=line,
            hint=f"define it in .dstack/variables.yaml (this workflow's variables: {known})",
        )

    def _plain_value(self, match: re.Match[str], where: str, line: int | None) -> str:
        name = self._name(match, where, line)
        if name in RESERVED_IN_SHELL:
            return match.group(0)
        if name in ARGS_NAMES:
            return config_args(self.variables)
        if name == "run.args":
            return " ".join(self.args)
        return self.variables[name]

    def _shell_value(self, match: re.Match[str], where: str, line: int | None) -> str:
        if match.group("expr") is None:
            return config_args(self.variables)
        name = self._name(match, where, line)
        if name in RESERVED_IN_SHELL:
            return RESERVED_IN_SHELL[name]
        if name in ARGS_NAMES:
            return config_args(self.variables)
        if name == "run.args":
            return " ".join(shlex.quote(a) for a in self.args)
        return shlex.quote(self.variables[name])


@dataclass
class VariableSections:
    """Defaults from `variables.yaml` and `configs.yaml`: `global` and one section per workflow."""

    sections: dict[str, dict[str, str]] = field(default_factory=dict)
    lines: dict[str, tuple[str, int]] = field(default_factory=dict)  # section -> (file, line)
    errors: dict[str, ConfigError] = field(default_factory=dict)  # section -> its first problem

    def for_workflow(self, name: str) -> dict[str, str]:
        """Global defaults merged with the workflow's own, in order; raise the first problem of either."""
        for section in ("global", name):
            if section in self.errors:
                raise self.errors[section]
        merged = dict(self.sections.get("global", {}))
        merged.update(self.sections.get(name, {}))
        return merged


def read_variable_sections(data: Any, top_key: str, file: str, into: VariableSections) -> None:
    """Add the sections of one parsed file (`variables:` or `configs:` at its top) to `into`."""
    if data is None:
        return
    if not isinstance(data, YMap):
        raise ConfigError(f"expected a mapping with '{top_key}:' at the top", file=file, line=1)
    for key in data:
        if key != top_key:
            raise ConfigError(
                f"unknown field '{key}'",
                file=file,
                line=data.line_of(key),
                hint=f"put sections under '{top_key}:'",
            )
    for key, dup_line, first in data.dups:
        raise ConfigError(
            f"duplicate key '{key}' (first at line {first})",
            file=file,
            line=dup_line,
            hint="remove one of them",
        )
    sections = data.get(top_key)
    if sections is None:
        return
    if not isinstance(sections, YMap):
        raise ConfigError(
            f"'{top_key}' must map 'global' and workflow names to variables",
            file=file,
            line=data.line_of(top_key),
        )
    for section, values in sections.items():
        line = sections.line_of(section)
        into.lines.setdefault(section, (file, line))
        try:
            parsed = _read_section(section, values, file, line)
        except ConfigError as e:
            into.errors.setdefault(section, e)
            continue
        into.sections.setdefault(section, {}).update(parsed)
    for key, dup_line, first in sections.dups:
        into.errors.setdefault(
            key,
            ConfigError(
                f"duplicate section '{key}' (first at line {first})",
                file=file,
                line=dup_line,
                hint="merge them into one",
            ),
        )


def _read_section(section: str, values: Any, file: str, line: int) -> dict[str, str]:
    if values is None:
        return {}
    if not isinstance(values, YMap):
        raise ConfigError(
            f"variables of '{section}' must be a mapping of name: default", file=file, line=line
        )
    for key, dup_line, first in values.dups:
        raise ConfigError(
            f"duplicate variable '{key}' (first at line {first})",
            file=file,
            line=dup_line,
            hint="remove one of them",
        )
    out: dict[str, str] = {}
    for name, value in values.items():
        where = values.line_of(name)
        if not is_identifier(name):
            raise ConfigError(
                f"variable name '{name}' is not an identifier",
                file=file,
                line=where,
                hint="use letters, digits and '_', not starting with a digit (e.g. learning_rate)",
            )
        if isinstance(value, YMap) and "default" in value:  # {type: ..., default: ...}
            value = value["default"]
        if isinstance(value, dict | list):
            raise ConfigError(
                f"variable '{name}' must be a single value",
                file=file,
                line=where,
                hint="quote it to pass a string",
            )
        out[name] = scalar_text(value)
    return out


def quote_env_value(value: str) -> str:
    """`value` double-quoted for `export K=…` so bash expands only `$NAME`/`${NAME}` in it (no `$(…)`,
    backticks or other expansions): `$PATH:src` → `"$PATH:src"`, `$(rm -rf /)` → `"\\$(rm -rf /)"`."""
    out, pos = ['"'], 0
    for m in _ENV_REF.finditer(value):
        out.append(_escape_dq(value[pos : m.start()]))
        out.append("${" + (m.group(1) or m.group(2)) + "}")
        pos = m.end()
    out.append(_escape_dq(value[pos:]))
    out.append('"')
    return "".join(out)


def _escape_dq(text: str) -> str:
    return "".join("\\" + c if c in '\\"`$' else c for c in text)


def expand_env(env: Mapping[str, str], base: Mapping[str, str]) -> dict[str, str]:
    """Expand `$NAME`/`${NAME}` references in `env` values against `base` then earlier entries, the way the
    job's shell would, without running anything (no command substitution)."""
    out: dict[str, str] = {}

    def lookup(m: re.Match[str]) -> str:
        key = m.group(1) or m.group(2)
        return out.get(key, base.get(key, ""))

    for key, value in env.items():
        out[key] = _ENV_REF.sub(lookup, value)
    return out
