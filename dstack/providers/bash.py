"""`provider: bash` (the default): the workflow's commands, run with `set -e`."""

from __future__ import annotations

from dstack.providers.base import Provider, ProviderContext, base_spec, fail
from dstack.specs import JobSpec
from dstack.workflows.models import Workflow


class BashProvider(Provider):
    """Runs `commands` in the job's working directory (in `image` when one is given)."""

    name = "bash"

    def job_spec(self, workflow: Workflow, ctx: ProviderContext) -> JobSpec:
        """Commands as written, with variables already quoted."""
        if not workflow.commands:
            fail(workflow, "nothing to run", hint="add 'commands:' (a list of shell lines)")
        return base_spec(workflow, self.name, list(workflow.commands))
