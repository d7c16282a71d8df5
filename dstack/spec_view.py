"""A job's stored spec read without pydantic: `spec_view(job.spec)` answers what the local run path asks.

`JobSpec.model_validate` imports pydantic and builds every spec model (~70 ms of a one-step `dstack run`).
The stored spec is `JobSpec.model_dump()`'s JSON, valid already, so reading its fields needs no validation.
A view gives JobSpec's fields (nested ones as views, with JobSpec's defaults for keys an older spec lacks);
anything else (`model_dump`, `key_material`, setting a field) is done on the real model, validated then.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any, cast

if TYPE_CHECKING:
    from dstack.specs import JobSpec

# model -> field -> default; a str default names a nested model (its default: that model's defaults),
# ("list", M) a list of model M, ("opt", M) an optional M. Kept equal to dstack/specs.py by a test.
FIELDS: dict[str, dict[str, Any]] = {
    "JobSpec": {
        "workflow": ...,
        "provider": "bash",
        "image": None,
        "entrypoint": None,
        "commands": [],
        "working_dir": ".",
        "env": {},
        "passthrough_env": [],
        "artifacts": ("list", "ArtifactSpec"),
        "depends_on": ("list", "DependencySpec"),
        "repo_include": None,
        "resources": "Resources",
        "ports": "PortsSpec",
        "retry": ("opt", "RetrySpec"),
        "inactivity_s": None,
        "max_duration_s": None,
        "python": ("opt", "PythonSpec"),
        "variables": {},
        "help": None,
        "notices": [],
    },
    "Resources": {
        "cpu": None,
        "memory_mib": None,
        "gpu": "GpuSpec",
        "shm_size_mib": None,
        "interruptible": False,
        "local": False,
        "remote": False,
        "nodes": 1,
        "disk_mib": None,
    },
    "GpuSpec": {"count": 0, "name": None, "memory_mib": None},
    "ArtifactSpec": {"path": ..., "real_time": False, "mount": False},
    "DependencySpec": {"workflow": None, "tag": None},
    "RetrySpec": {"limit": 0, "on": ["interruption", "host-lost"]},
    "PortsSpec": {"count": 0, "fixed": []},
    "PythonSpec": {"version": None, "requirements": None},
}


class SpecView:
    """Read-only fields of one stored spec model; the real pydantic model for everything else."""

    __slots__ = ("_kind", "_data", "_real")

    def __init__(self, kind: str, data: dict[str, Any]) -> None:
        object.__setattr__(self, "_kind", kind)
        object.__setattr__(self, "_data", data)
        object.__setattr__(self, "_real", None)

    def __getattr__(self, name: str) -> Any:
        real = self._real
        fields = FIELDS[self._kind]
        if real is not None or name not in fields:
            return getattr(self.real(), name)
        default = fields[name]
        value = self._data.get(name, _MISSING)
        if isinstance(default, str) and default in FIELDS:  # a nested model
            if value is _MISSING:
                return SpecView(default, {})
            if isinstance(value, dict):
                return SpecView(default, value)
        elif isinstance(default, tuple):
            shape, model = default
            if value is _MISSING:
                return [] if shape == "list" else None
            if shape == "opt" and value is None:
                return None
            if shape == "list" and isinstance(value, list) and all(isinstance(v, dict) for v in value):
                return [SpecView(model, v) for v in value]
            if shape == "opt" and isinstance(value, dict):
                return SpecView(model, value)
        else:
            if value is _MISSING:
                if default is ...:
                    return getattr(self.real(), name)  # required and missing: pydantic says what is wrong
                return copy.copy(default)
            return copy.copy(value) if isinstance(value, (list, dict)) else value  # as validating copies them
        return getattr(self.real(), name)  # not the shape stored specs have: validation says what is wrong

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self.real(), name, value)

    def real(self) -> Any:
        """The pydantic model of this view's data (validated on first use)."""
        if self._real is None:
            from dstack import specs

            object.__setattr__(self, "_real", getattr(specs, self._kind).model_validate(self._data))
        return self._real

    def __repr__(self) -> str:
        return f"SpecView({self._kind}, {self._data!r})"


_MISSING = object()


def spec_view(spec: dict[str, Any] | JobSpec) -> JobSpec:
    """`JobSpec.model_validate(spec)` for reading a stored spec, without pydantic (typed as the JobSpec it
    stands for). A spec not of the shape `model_dump` gives is validated at once (and fails as it would)."""
    if not isinstance(spec, dict):  # a typed spec already (a JobSpec): nothing to read
        return cast("JobSpec", spec)
    view = SpecView("JobSpec", spec)
    if not well_formed("JobSpec", spec):
        view.real()
    return cast("JobSpec", view)


def well_formed(kind: str, data: object) -> bool:
    """Whether `data` has the shape a dumped `kind` has: known keys, the required ones, nested models as
    objects, and scalars of their default's type. False only means "let pydantic judge"."""
    if not isinstance(data, dict):
        return False
    fields = FIELDS[kind]
    if any(default is ... and name not in data for name, default in fields.items()):
        return False
    for name, value in data.items():
        default = fields.get(name, _MISSING)
        if default is _MISSING:
            return False  # the models forbid extra fields
        if isinstance(default, str) and default in FIELDS:
            if not well_formed(default, value):
                return False
        elif isinstance(default, tuple):
            shape, model = default
            if shape == "list":
                if not isinstance(value, list) or not all(well_formed(model, v) for v in value):
                    return False
            elif value is not None and not well_formed(model, value):
                return False
        elif default is not None and default is not ... and type(value) is not type(default):
            return False
    return True
