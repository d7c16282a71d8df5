"""Providers turn a workflow into a job spec; built-ins and plugins (`dstack.providers` entry points)."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from dstack.errors import ConfigError

if TYPE_CHECKING:
    from importlib.metadata import EntryPoint

    from dstack.providers.base import Provider

BUILTIN: dict[str, str] = {
    "bash": "dstack.providers.bash:BashProvider",
    "python": "dstack.providers.python:PythonProvider",
    "docker": "dstack.providers.docker:DockerProvider",
    "curl": "dstack.providers.curl:CurlProvider",
    "code": "dstack.providers.devenv:CodeProvider",
    "lab": "dstack.providers.devenv:LabProvider",
    "notebook": "dstack.providers.devenv:NotebookProvider",
    "streamlit": "dstack.providers.apps:StreamlitProvider",
    "fastapi": "dstack.providers.apps:FastapiProvider",
    "torchrun": "dstack.providers.torchrun:TorchrunProvider",
}
_plugins: dict[str, EntryPoint] | None = None


def _entry_points() -> dict[str, EntryPoint]:
    global _plugins
    if _plugins is None:
        from importlib.metadata import entry_points

        _plugins = {ep.name: ep for ep in entry_points(group="dstack.providers")}
    return _plugins


def provider_names() -> list[str]:
    """Every provider name: built-ins first, then plugins."""
    return list(BUILTIN) + sorted(set(_entry_points()) - set(BUILTIN))


def is_provider(name: str) -> bool:
    """Whether `name` is a built-in or installed provider (plugins are looked up only when needed)."""
    return name in BUILTIN or name in _entry_points()


def get_provider(name: str) -> Provider:
    """The provider called `name` (an installed entry point, else the built-in table)."""
    ep = _entry_points().get(name)
    target = ep.value if ep is not None else BUILTIN.get(name)
    if target is None:
        raise ConfigError(f"unknown provider '{name}'", hint=f"use one of: {', '.join(provider_names())}")
    module, _, attr = target.partition(":")
    cls = getattr(importlib.import_module(module), attr)
    provider: Provider = cls()
    return provider
