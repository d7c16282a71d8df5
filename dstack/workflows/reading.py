"""What reading a workflow item needs throughout: the item, its file, failing at a line, and small helpers."""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping
from typing import Any, NoReturn

from pydantic import BaseModel, ValidationError

from dstack.errors import ConfigError
from dstack.workflows.variables import Substituter
from dstack.workflows.yamlfile import YList, YMap, scalar_text


def suggest(name: str, choices: list[str]) -> str | None:
    """'did you mean …?' for a misspelled name, or None."""
    near = difflib.get_close_matches(name, choices, n=1, cutoff=0.6)
    if not near:
        near = [c for c in choices if c.lower() == name.lower()]
    return f"did you mean '{near[0]}'?" if near else None


class Reader:
    """One workflow item being read; every problem is one ConfigError at its line (`fail`)."""

    def __init__(
        self,
        item: YMap,
        file: str,
        subst: Substituter,
        templates: Mapping[str, YMap],
        is_provider: Callable[[str], bool],
        provider_names: list[str],
    ) -> None:
        self.item = item
        self.file = file
        self.subst = subst
        self.templates = templates
        self.is_provider = is_provider
        self.provider_names = provider_names

    def fail(self, message: str, line: int | None = None, hint: str | None = None) -> NoReturn:
        raise ConfigError(message, file=self.file, line=line or self.item.line, hint=hint)

    def at(self, key: str) -> int:
        return self.item.line_of(key)

    def _check_keys(self, mapping: YMap, known: list[str], prefix: str) -> None:
        for key in mapping:
            if key not in known:
                self.fail(f"unknown field '{prefix}{key}'", mapping.line_of(key), hint=suggest(key, known))

    def _plain(self, value: str | None, key: str) -> str | None:
        return None if value is None else self.subst.plain(value, key, self.at(key))

    def _text_list(self, key: str) -> list[tuple[str, int]]:
        """A string or a list of strings (no empty entries), with each one's line."""
        value = self.item.get(key)
        if value is None:
            return []
        if not isinstance(value, list):
            if isinstance(value, dict):
                self.fail(
                    f"'{key}' must be a list of strings",
                    self.at(key),
                    hint="quote lines that contain ': ' so YAML doesn't read a mapping",
                )
            return [(scalar_text(value), self.at(key))]
        out = []
        for i, entry in enumerate(value):
            line = value.line_of(i) if isinstance(value, YList) else self.at(key)
            if entry is None:
                self.fail(f"empty item in '{key}'", line, hint="remove the bare '-' line or write a value")
            if isinstance(entry, dict | list):
                self.fail(
                    f"'{key}[{i}]' must be a string",
                    line,
                    hint="quote lines that contain ': ' so YAML doesn't read a mapping",
                )
            out.append((scalar_text(entry), line))
        return out


def canonical_keys(mapping: YMap, known: list[str]) -> YMap:
    """`GPU:` is `gpu:`: keys that differ from a known one only in case are renamed."""
    lower = {k.lower(): k for k in known}
    if all(k in known or k.lower() not in lower for k in mapping):
        return mapping
    out = YMap(mapping.line)
    out.dups = mapping.dups
    for key, value in mapping.items():
        name = key if key in known else lower.get(key.lower(), key)
        out[name] = value
        out.lines[name] = mapping.line_of(key)
    return out


def copy_map(mapping: YMap) -> YMap:
    out = YMap(mapping.line)
    out.update(mapping)
    out.lines, out.dups = dict(mapping.lines), mapping.dups
    return out


def validated(model: type[BaseModel], data: Any, file: str, line: int, where: str) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        loc = ".".join(str(p) for p in first["loc"])
        raise ConfigError(
            f"'{where}.{loc}': {first['msg'][0].lower()}{first['msg'][1:]}", file=file, line=line
        ) from None
