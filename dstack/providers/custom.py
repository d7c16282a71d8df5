"""A provider defined in `.dstack/providers.yaml` (`name`, `image`, `commands`)."""

from __future__ import annotations

from dstack.providers.base import Provider, ProviderContext, base_spec
from dstack.specs import JobSpec
from dstack.workflows.models import CustomProviderDef, Workflow
from dstack.workflows.variables import Substituter


class CustomProvider(Provider):
    """The definition's commands (variables substituted), then the workflow's own, in its image."""

    def __init__(self, definition: CustomProviderDef) -> None:
        self.definition = definition
        self.name = definition.name

    def job_spec(self, workflow: Workflow, ctx: ProviderContext) -> JobSpec:
        """Definition commands first; the workflow's `image` wins over the definition's."""
        d = self.definition
        subst = Substituter(dict(workflow.variables), list(ctx.args), file=d.file)
        commands = [subst.shell(c, f"providers.{d.name}.commands", d.line) for c in d.commands]
        image = workflow.image or (
            subst.plain(d.image, f"providers.{d.name}.image", d.line) if d.image else None
        )
        return base_spec(workflow, self.name, [*commands, *workflow.commands], image=image)
