"""`provider: python`: run a script with arguments in a venv of the requested Python version."""

from __future__ import annotations

from dstack.providers.base import Provider, ProviderContext, base_spec, fail, python_line
from dstack.specs import JobSpec
from dstack.workflows.models import Workflow


class PythonProvider(Provider):
    """`python SCRIPT ARGS` after the workflow's own commands; the runner builds the venv."""

    name = "python"

    def job_spec(self, workflow: Workflow, ctx: ProviderContext) -> JobSpec:
        """Commands: the workflow's commands (setup), then the script."""
        if not workflow.script:
            fail(workflow, "the python provider needs a script", hint="add `script: train.py`")
        return base_spec(
            workflow, self.name, [*workflow.commands, python_line(workflow.script, workflow.args)]
        )
