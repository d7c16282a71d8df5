"""`provider: hello`: greets `${{ name }}` (default "world") and saves the greeting as an artifact."""

from __future__ import annotations

from dstack.providers.base import Provider, ProviderContext, base_spec, fail
from dstack.specs import ArtifactSpec, JobSpec
from dstack.workflows.models import Workflow


class HelloProvider(Provider):
    """Writes `greeting.txt` ("Hello, NAME!"), then runs the workflow's own commands, if any."""

    name = "hello"

    def job_spec(self, workflow: Workflow, ctx: ProviderContext) -> JobSpec:
        """One job: the greeting, then the workflow's commands; `greeting.txt` is always an artifact."""
        if workflow.image:
            fail(workflow, "the hello provider runs on the host", hint="remove `image:`")
        commands = [
            'echo "Hello, ${name:-world}!" > greeting.txt',  # variables reach the job as env vars
            "cat greeting.txt",
            *workflow.commands,
        ]
        spec = base_spec(workflow, self.name, commands)
        if not any(a.path == "greeting.txt" for a in spec.artifacts):
            spec.artifacts.append(ArtifactSpec(path="greeting.txt"))
        return spec
