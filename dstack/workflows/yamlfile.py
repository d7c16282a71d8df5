"""YAML loading that keeps line numbers, scalars' text and duplicate keys (PyYAML drops all three)."""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path
from typing import Any, NoReturn

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
_SCALAR_TAGS = {_STR, _NULL, _BOOL, _FLOAT, "tag:yaml.org,2002:int", "tag:yaml.org,2002:timestamp", _MERGE}
MAX_ALIAS_NODES = 50_000
MAX_DEPTH = 200
NOT_A_FILE_HINT = "make it a regular YAML file, or remove it"


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
        text = read_config_file(path, display).decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError("not a text file", file=display, hint="save it as UTF-8 YAML") from e
    return parse_yaml(text, display)


def config_file_problem(path: Path) -> str | None:
    """Why `path` (which exists, perhaps as a broken link) can't be a config file, or None if it can."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return f"is a symlink to {os.readlink(path)!r}, which does not exist" if path.is_symlink() else None
    except OSError as e:
        return f"can't be read: {e.strerror}"
    if stat.S_ISDIR(st.st_mode):
        return "is a directory, not a file"
    if not stat.S_ISREG(st.st_mode):
        kind = "FIFO" if stat.S_ISFIFO(st.st_mode) else "socket" if stat.S_ISSOCK(st.st_mode) else "device"
        return f"is a {kind}, not a regular file"
    return None


def read_config_file(path: Path, display: str) -> bytes:
    """A regular file's bytes; a directory, FIFO, device or dangling link is a ConfigError, never a hang."""
    problem = config_file_problem(path)
    if problem is None:
        try:  # O_NONBLOCK: a FIFO swapped in after the check must not hang the open
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
        except OSError as e:
            raise ConfigError(f"can't be read: {e.strerror}", file=display) from e
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                problem = "is not a regular file"
            else:
                try:
                    return f.read()
                except OSError as e:
                    raise ConfigError(f"can't be read: {e.strerror}", file=display) from e
    raise ConfigError(problem, file=display, hint=NOT_A_FILE_HINT)


def parse_yaml(text: str, display: str) -> Any:
    """Parse YAML text (see `load_yaml`)."""
    try:
        _check_expansion(text, display)
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
        return None if node is None else _Builder(display).build(node)
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


def _check_expansion(text: str, display: str) -> None:
    """Refuse, before composing, documents whose aliases expand past MAX_ALIAS_NODES (a "billion laughs"
    bomb) or that nest deeper than MAX_DEPTH (the C composer recurses): one pass over the events."""
    sizes: dict[str, int] = {}  # anchor -> nodes it expands to
    stack: list[list[Any]] = [[None, 0]]  # open collections: [anchor, nodes so far]
    extra = 0  # nodes that exist only through aliases
    for event in yaml.parse(text, Loader=_Loader):
        if isinstance(event, yaml.AliasEvent):
            size = sizes.get(event.anchor or "", 1)
            stack[-1][1] += size
            extra += size - 1
            if extra > MAX_ALIAS_NODES:
                raise ConfigError(
                    f"too many YAML aliases: they expand to more than {MAX_ALIAS_NODES} values",
                    file=display,
                    line=_line(event),
                    hint="use fewer or smaller anchors (&name) and aliases (*name)",
                )
        elif isinstance(event, yaml.ScalarEvent):
            stack[-1][1] += 1
            if event.anchor:
                sizes[event.anchor] = 1
        elif isinstance(event, yaml.CollectionStartEvent):
            stack.append([event.anchor, 1])
            if len(stack) > MAX_DEPTH:
                raise ConfigError(
                    f"YAML nested more than {MAX_DEPTH} levels deep",
                    file=display,
                    line=_line(event),
                    hint="flatten this value",
                )
        elif isinstance(event, yaml.CollectionEndEvent):
            anchor, size = stack.pop()
            stack[-1][1] += size
            if anchor:
                sizes[anchor] = size


class _Builder:
    """Composed nodes to YMap/YList/scalars; a tag dstack doesn't read is a ConfigError naming it."""

    def __init__(self, file: str) -> None:
        self.file = file

    def fail(self, message: str, node: yaml.Node, hint: str | None = None) -> NoReturn:
        raise ConfigError(message, file=self.file, line=node.start_mark.line + 1, hint=hint)

    def build(self, node: yaml.Node) -> Any:
        if isinstance(node, yaml.MappingNode):
            if node.tag != _MAP:
                self._unknown_tag(node)
            return self._map(node)
        if isinstance(node, yaml.SequenceNode):
            if node.tag != _SEQ:
                self._unknown_tag(node)
            out = YList(node.start_mark.line + 1)
            for item in node.value:
                out.append(self.build(item))
                out.lines.append(item.start_mark.line + 1)
            return out
        return self._scalar(node)

    def _unknown_tag(self, node: yaml.Node) -> NoReturn:
        tag = node.tag.replace("tag:yaml.org,2002:", "!!")
        self.fail(
            f"unknown YAML tag '{tag}'",
            node,
            hint="remove the tag: dstack reads plain strings, numbers, lists and mappings",
        )

    def _scalar(self, node: yaml.Node) -> Any:
        tag = node.tag
        if tag in (_STR, _MERGE):  # `<<` outside a mapping's key is just text
            return node.value
        if tag == _NULL:
            return None
        if tag == _BOOL:
            return node.value.lower() in ("yes", "true", "on")
        if tag not in _SCALAR_TAGS:
            self._unknown_tag(node)
        try:
            value = _constructor.construct_object(node, deep=True)
        except (yaml.YAMLError, ValueError) as e:
            shown = tag.replace("tag:yaml.org,2002:", "!!")
            line = node.start_mark.line + 1
            raise ConfigError(f"can't read {node.value!r} as {shown}", file=self.file, line=line) from e
        if tag == _FLOAT and isinstance(value, float):
            return YFloat(value, node.value)
        return value

    def _key(self, node: yaml.Node) -> str:
        if isinstance(node, yaml.ScalarNode):
            if node.tag not in _SCALAR_TAGS:
                self._unknown_tag(node)
            return str(node.value)  # `on:` stays "on", `1:` stays "1"
        raise _NotHere(node)

    def _map(self, node: yaml.MappingNode) -> YMap:
        out = YMap(node.start_mark.line + 1)
        merged: list[YMap] = []
        for key_node, value_node in node.value:
            if key_node.tag == _MERGE:
                sources = value_node.value if isinstance(value_node, yaml.SequenceNode) else [value_node]
                for source in sources:
                    built = self.build(source)
                    if not isinstance(built, YMap):
                        self.fail(
                            f"'<<' merges mappings, not {_kind(built)}",
                            key_node,
                            hint="write `<<: *anchor` where `&anchor` marks a mapping, or remove the line",
                        )
                    merged.append(built)
                continue
            key = self._key(key_node)
            line = key_node.start_mark.line + 1
            if key in out.lines:
                out.dups.append((key, line, out.lines[key]))
            out[key] = self.build(value_node)
            out.lines[key] = line
        for source in merged:  # `<<: *anchor`: explicit keys win
            for key, value in source.items():
                if key not in out.lines:
                    out[key] = value
                    out.lines[key] = source.line_of(key)
        return out


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, list):
        return "a list"
    return f"{scalar_text(value)!r}"


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


def _line(event: yaml.Event) -> int | None:
    return event.start_mark.line + 1 if event.start_mark else None
