"""The provider interface and what all providers share."""

from __future__ import annotations

import shlex
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from dstack.errors import ConfigError
from dstack.specs import JobSpec, PythonSpec
from dstack.workflows.models import Workflow


@dataclass(frozen=True)
class ProviderContext:
    """What a provider may need beyond the workflow: the project root, variables and `run` arguments."""

    root: Path
    variables: dict[str, str] = field(default_factory=dict)
    args: list[str] = field(default_factory=list)


class Provider(ABC):
    """Turns one normalized workflow into one job spec."""

    name: str = ""

    @abstractmethod
    def job_spec(self, workflow: Workflow, ctx: ProviderContext) -> JobSpec:
        """The job spec of `workflow`; raise ConfigError (file:line) for what the provider can't run."""


# A variable `path` must not become PATH: these upper-case aliases are never set.
PROTECTED_ENV = {
    "PATH",
    "HOME",
    "SHELL",
    "USER",
    "PWD",
    "IFS",
    "ENV",
    "BASH_ENV",
    "LD_PRELOAD",
    "LD_LIBRARY_PATH",
    "PYTHONPATH",
    "PYTHONHOME",
    "TMPDIR",
    "LANG",
    "TERM",
}


def fail(workflow: Workflow, message: str, hint: str | None = None) -> NoReturn:
    """Raise a ConfigError about `workflow`, at its line."""
    raise ConfigError(
        f"workflow '{workflow.name}': {message}", file=workflow.file, line=workflow.line, hint=hint
    )


def base_spec(workflow: Workflow, provider: str, commands: list[str], **fields: Any) -> JobSpec:
    """A job spec with everything common to providers; variables reach the job as `name` and `NAME`
    (`batch-size` as `batch_size`), and the commands' `${{ x }}` references are defined first."""
    from dstack.workflows.variables import env_name

    env: dict[str, str] = {}
    notices = list(workflow.notices)
    commands = with_definitions(commands, workflow.variables)
    for name, value in workflow.variables.items():
        key = env_name(name)
        env[key] = value
        upper = key.upper()
        if upper != key and upper in PROTECTED_ENV:
            notices.append(f"variable '{key}' is not exported as {upper} (that would replace the job's own)")
        else:
            env.setdefault(upper, value)
    env.update(workflow.env)
    python = None
    if workflow.python_version or workflow.requirements:
        python = PythonSpec(version=workflow.python_version, requirements=workflow.requirements)
    spec = JobSpec(
        workflow=workflow.name,
        provider=provider,
        image=workflow.image,
        commands=commands,
        working_dir=workflow.working_dir,
        env=env,
        passthrough_env=list(workflow.passthrough_env),
        artifacts=[a.model_copy() for a in workflow.artifacts],
        depends_on=[d.model_copy() for d in workflow.depends_on],
        repo_include=workflow.repo_include,
        resources=workflow.resources.model_copy(deep=True),
        ports=workflow.ports.model_copy(deep=True),
        retry=workflow.retry,
        inactivity_s=workflow.inactivity_s,
        max_duration_s=workflow.max_duration_s,
        python=python,
        variables=dict(workflow.variables),
        help=workflow.help,
        notices=notices,
    )
    for key, value in fields.items():
        setattr(spec, key, value)
    return spec


def with_definitions(commands: list[str], variables: dict[str, str]) -> list[str]:
    """`commands` after the definitions of the `${DSTACK_VAR_x}` they refer to (see `Substituter.shell`):
    every provider that sets a spec's commands sets them through this."""
    from dstack.workflows.variables import shell_definitions

    return [*shell_definitions(commands, variables), *commands]


def python_line(script: str, args: str, module: bool = False) -> str:
    """`python SCRIPT ARGS` with the script quoted and args already a shell fragment."""
    head = f"python -m {script}" if module else f"python {shlex.quote(script)}"
    return f"{head} {args}".strip()
