"""`provider: docker` (or just `image:`): an image with optional commands."""

from __future__ import annotations

from dstack.providers.base import Provider, ProviderContext, base_spec, fail
from dstack.specs import JobSpec
from dstack.workflows.models import Workflow


class DockerProvider(Provider):
    """Runs `commands` in `image`; with no commands, the image's own command (`entrypoint=None`)."""

    name = "docker"

    def job_spec(self, workflow: Workflow, ctx: ProviderContext) -> JobSpec:
        """The image is required; commands are optional."""
        if not workflow.image:
            fail(workflow, "the docker provider needs an image", hint="add `image: ubuntu:22.04`")
        return base_spec(workflow, self.name, list(workflow.commands), entrypoint=None)
