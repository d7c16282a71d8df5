"""Variables: reading `variables.yaml`/`configs.yaml`, and `${{ var }}` substitution that never leaves a
value unquoted in a shell line."""

from __future__ import annotations

import re
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from dstack.errors import ConfigError
from dstack.workflows.envquote import ENV_REF as _ENV_REF
from dstack.workflows.envquote import escape_dq as _escape_dq
from dstack.workflows.envquote import quote_env_value as quote_env_value
from dstack.workflows.shellcontext import Piece, placeholders, render
from dstack.workflows.yamlfile import YMap, scalar_text

RESERVED_IN_SHELL = {"run_name": "RUN_NAME", "job_id": "JOB_ID"}  # set by the runner for every job
ARGS_NAMES = ("config_args", "variables_as_args")
SHELL_PREFIX = "DSTACK_VAR_"  # `${{ x }}` in a shell line is `${DSTACK_VAR_x}`, defined before the commands
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_VARIABLE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(?:-[A-Za-z0-9_]+)*$")  # `batch-size` (Feb 2022 docs)
_EXPR = r"\$\{\{(?P<expr>.*?)\}\}"
_PLAIN = re.compile(_EXPR)
_SHELL = re.compile(
    _EXPR + r"|\$\{(?P<braced>config_args|variables_as_args)\}"
    r"|\$(?P<bare>config_args|variables_as_args)(?![A-Za-z0-9_])"
)
_SHELL_REF = re.compile(r"\$\{" + SHELL_PREFIX + r"([A-Za-z0-9_]+)\}")


def is_identifier(name: str) -> bool:
    """A variable or environment name: letters, digits and `_`, not starting with a digit."""
    return bool(_IDENT.match(name))


def is_variable_name(name: str) -> bool:
    """An identifier, or words of one joined by hyphens (`batch-size`)."""
    return bool(_VARIABLE.match(name))


def env_name(name: str) -> str:
    """The name a variable has in the job's environment: `batch-size` is `batch_size`."""
    return name.replace("-", "_")


def find_variable(variables: Mapping[str, str], name: str) -> str | None:
    """The defined variable `name` means (`batch_size` finds `batch-size`), or None."""
    if name in variables:
        return name
    wanted = env_name(name)
    return next((k for k in variables if env_name(k) == wanted), None)


def config_args(variables: Mapping[str, str]) -> str:
    """`--name 'value' …` for every variable, each value shell-quoted."""
    return " ".join(f"--{name} {shlex.quote(value)}" for name, value in variables.items())


def shell_definitions(commands: list[str], variables: Mapping[str, str]) -> list[str]:
    """`DSTACK_VAR_x='value'` lines for the variables `commands` refer to, each value quoted as data."""
    by_env = {env_name(k): v for k, v in variables.items()}
    lines: list[str] = []
    for ident in dict.fromkeys(m.group(1) for c in commands for m in _SHELL_REF.finditer(c)):
        if ident in by_env:
            lines.append(f"{SHELL_PREFIX}{ident}={shlex.quote(by_env[ident])}")
    return lines


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
        """A shell line whose `${{ x }}` become references to shell variables (`"${DSTACK_VAR_x}"`), written
        for the quoting they sit in (bare, inside "…", inside '…', in a here-document): values are never
        parsed by the shell, whatever quotes the author put around them."""
        out: list[str] = []
        pos = 0
        for match, context in placeholders(text, _SHELL):
            out.append(text[pos : match.start()])
            pieces = self._shell_pieces(match, where, line)
            if context == "quoted-heredoc":
                raise ConfigError(
                    f"'{match.group(0)}' in '{where}' is inside a quoted here-document, where nothing is"
                    " expanded",
                    file=self.file,
                    line=line,
                    hint="write <<EOF instead of <<'EOF' to use variables in it",
                )
            out.append(self._render_args(context) if pieces is None else render(pieces, context))
            pos = match.end()
        out.append(text[pos:])
        return "".join(out)

    def _name(self, match: re.Match[str], where: str, line: int | None) -> str:
        name = match.group("expr").strip()
        if name in RESERVED_IN_SHELL or name in ARGS_NAMES or name == "run.args":
            return name
        found = find_variable(self.variables, name)
        if found is not None:
            return found
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

    def _shell_pieces(self, match: re.Match[str], where: str, line: int | None) -> list[Piece] | None:
        """What a placeholder stands for, or None for `${{ run.args }}` (the run's own arguments)."""
        name = ARGS_NAMES[0] if match.group("expr") is None else self._name(match, where, line)
        if name in RESERVED_IN_SHELL:
            return [(RESERVED_IN_SHELL[name], True)]
        if name in ARGS_NAMES:
            pieces: list[Piece] = []
            for i, key in enumerate(self.variables):
                pieces += [(f"{' ' if i else ''}--{key} ", False), (SHELL_PREFIX + env_name(key), True)]
            return pieces
        if name == "run.args":
            return None
        return [(SHELL_PREFIX + env_name(name), True)]

    def _render_args(self, context: str) -> str:
        """The run's own arguments (typed by whoever runs it), quoted for `context`."""
        joined = " ".join(self.args)
        if context == "bare":
            return " ".join(shlex.quote(a) for a in self.args)
        if context == "double":
            return _escape_dq(joined)
        if context == "heredoc":
            return "".join("\\" + c if c in "\\`$" else c for c in joined)
        return "'" + shlex.quote(joined) + ("'" if context == "single" else "$'")


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
        for key, value in self.sections.get(name, {}).items():
            same = find_variable(merged, key)  # the workflow's `batch_size` overrides a global `batch-size`
            if same is not None and same != key:
                del merged[same]
            merged[key] = value
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
        if not is_variable_name(name):
            raise ConfigError(
                f"variable name '{name}' is not a name",
                file=file,
                line=where,
                hint="use letters, digits, '_' and '-', starting with a letter (e.g. learning-rate)",
            )
        same = find_variable(out, name)
        if same is not None:
            raise ConfigError(
                f"variables '{same}' and '{name}' are the same variable ${env_name(name)} in the job",
                file=file,
                line=where,
                hint="keep one of them",
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
