"""Reading `.dstack/`: workflows, variables, providers and settings, as researchers wrote them."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pathlib import Path

    from dstack.workflows.project import Project

__all__ = ["Project", "json_schema", "load_project"]


def __getattr__(name: str) -> Any:
    if name == "Project":
        from dstack.workflows.project import Project

        return Project
    raise AttributeError(name)


def load_project(cwd: Path) -> Project:
    """The project of the nearest folder holding `.dstack/`, from `cwd` up to the Git repo root."""
    from dstack.workflows.project import load_project as load

    return load(cwd)


def json_schema() -> dict[str, Any]:
    """JSON schema of `.dstack/workflows.yaml`."""
    from dstack.workflows.schema import json_schema as schema

    return schema()
