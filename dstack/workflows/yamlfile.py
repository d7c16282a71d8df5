"""YAML loading that keeps line numbers, scalars' text and duplicate keys (PyYAML drops all three)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from dstack.errors import ConfigError

_Loader: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_constructor = yaml.constructor.SafeConstructor()

_MAP = "tag:yaml.org,2002:map"
_SEQ = "tag:yaml.org,2002:seq"
_MERGE = "tag:yaml.org,2002:merge"
_NULL = "tag:yaml.org,2002:null"
_BOOL = "tag:yaml.org,2002:bool"
_STR = "tag:yaml.org,2002:str"
_FLOAT = "tag:yaml.org,2002:float"


class YMap(dict):
    """A YAML mapping: keys are strings as written; `lines` gives each key's line (1-based)."""

    def __init__(self, line: int) -> None:
        super().__init__()
        self.line = line
        self.lines: dict[str, int] = {}
        self.dups: list[tuple[str, int, int]] = []  # (key, line, first line)

    def line_of(self, key: str) -> int:
        """The line of `key`, or of the mapping itself when the key is absent."""
        return self.lines.get(key, self.line)


class YList(list):
    """A YAML sequence; `lines[i]` is the line of item i (1-based)."""

    def __init__(self, line: int) -> None:
        super().__init__()
        self.line = line
        self.lines: list[int] = []

    def line_of(self, index: int) -> int:
        """The line of item `index`, or of the list itself."""
        return self.lines[index] if 0 <= index < len(self.lines) else self.line


class YFloat(float):
    """A float that remembers its text: `python: 3.10` is 3.1 to YAML but "3.10" to the author."""

    text: str

    def __new__(cls, value: float, text: str) -> YFloat:
        obj = super().__new__(cls, value)
        obj.text = text
        return obj


def scalar_text(value: Any) -> str:
    """A scalar as the author wrote it: floats keep their text, booleans are lowercase, null is ''."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, YFloat):
        return value.text
    return str(value)


def load_yaml(path: Path, display: str) -> Any:
    """Parse one YAML file into YMap/YList/scalars; raise ConfigError with file:line if it isn't YAML."""
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError("not a text file", file=display, hint="save it as UTF-8 YAML") from e
    except OSError as e:
        raise ConfigError(f"can't be read: {e.strerror}", file=display) from e
    return parse_yaml(text, display)


def parse_yaml(text: str, display: str) -> Any:
    """Parse YAML text (see `load_yaml`)."""
    try:
        node = yaml.compose(text, Loader=_Loader)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        problem = (e.problem or e.context or "syntax error").strip()
        line, hint = mark.line + 1 if mark else None, "check the indentation, colons and quotes on this line"
        squeezed = no_space_after_colon(text, line)
        if squeezed:
            line, hint = squeezed
        raise ConfigError(f"not valid YAML: {problem}", file=display, line=line, hint=hint) from e
    except yaml.YAMLError as e:
        raise ConfigError(f"not valid YAML: {e}", file=display) from e
    try:
        return None if node is None else _build(node)
    except _NotHere as e:  # a mapping or list used as a key, from `gpu: {{gpu}}`
        raise ConfigError(e.message, file=display, line=e.line, hint=e.hint) from None


_SQUEEZED = re.compile(r"^\s*(?:-\s+)?([A-Za-z_][\w./-]*):([^\s:/][^\s]*)\s*$")


def no_space_after_colon(text: str, line: int | None) -> tuple[int, str] | None:
    """(line, hint) when `line` or the one before it reads `gpu:0`: a key and value without the space YAML
    needs after ':'."""
    lines = text.splitlines()
    for number in (line, line - 1) if line else ():
        m = _SQUEEZED.match(lines[number - 1]) if 0 < number <= len(lines) else None
        if m:
            return number, f"YAML needs a space after ':': write `{m.group(1)}: {m.group(2)}`"
    return None


def _build(node: yaml.Node) -> Any:
    if isinstance(node, yaml.MappingNode):
        return _build_map(node)
    if isinstance(node, yaml.SequenceNode):
        out = YList(node.start_mark.line + 1)
        for item in node.value:
            out.append(_build(item))
            out.lines.append(item.start_mark.line + 1)
        return out
    return _build_scalar(node)


def _build_scalar(node: yaml.Node) -> Any:
    tag = node.tag
    if tag == _STR:
        return node.value
    if tag == _NULL:
        return None
    if tag == _BOOL:
        return node.value.lower() in ("yes", "true", "on")
    value = _constructor.construct_object(node, deep=True)
    if tag == _FLOAT and isinstance(value, float):
        return YFloat(value, node.value)
    return value


class _NotHere(ConfigError):
    """YAML that parses, but never as anything dstack reads: `{{ gpu }}` (a mapping as a key)."""

    def __init__(self, node: yaml.Node) -> None:
        inner = node.value[0][0] if isinstance(node, yaml.MappingNode) and len(node.value) == 1 else None
        line = node.start_mark.line + 1
        if not isinstance(inner, yaml.ScalarNode):
            super().__init__("not valid YAML here: a mapping or list used as a key", line=line)
            return
        name = str(inner.value).strip()
        super().__init__(
            f"not valid YAML here: `{{{{{name}}}}}` is read as a mapping inside a mapping",
            line=line,
            hint=f"write `${{{{ {name} }}}}` for the variable (quote the value if it starts with '{{')",
        )


def _key(node: yaml.Node) -> str:
    if isinstance(node, yaml.ScalarNode):
        return str(node.value)  # `on:` stays "on", `1:` stays "1"
    raise _NotHere(node)


def _build_map(node: yaml.MappingNode) -> YMap:
    out = YMap(node.start_mark.line + 1)
    merged: list[YMap] = []
    for key_node, value_node in node.value:
        if key_node.tag == _MERGE:
            sources = value_node.value if isinstance(value_node, yaml.SequenceNode) else [value_node]
            merged.extend(m for m in (_build(s) for s in sources) if isinstance(m, YMap))
            continue
        key = _key(key_node)
        line = key_node.start_mark.line + 1
        if key in out.lines:
            out.dups.append((key, line, out.lines[key]))
        out[key] = _build(value_node)
        out.lines[key] = line
    for source in merged:  # `<<: *anchor`: explicit keys win
        for key, value in source.items():
            if key not in out.lines:
                out[key] = value
                out.lines[key] = source.line_of(key)
    return out


def find_duplicates(value: Any) -> list[tuple[str, int, int]]:
    """Every duplicate key under `value`, as (key, line, first line)."""
    found: list[tuple[str, int, int]] = []
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, YMap):
            found.extend(item.dups)
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return sorted(found, key=lambda d: d[1])


def plain(value: Any) -> Any:
    """A copy with plain dicts, lists and scalars (for values handed outside, such as triggers)."""
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain(v) for v in value]
    if isinstance(value, YFloat):
        return float(value)
    return value
