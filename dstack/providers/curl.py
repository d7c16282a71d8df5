"""`provider: curl`: download a URL and save it as an artifact."""

from __future__ import annotations

import posixpath
import shlex

from dstack.providers.base import Provider, ProviderContext, base_spec, fail
from dstack.specs import ArtifactSpec, JobSpec
from dstack.workflows.models import Workflow


class CurlProvider(Provider):
    """`curl URL -o OUTPUT`; OUTPUT becomes an artifact."""

    name = "curl"

    def job_spec(self, workflow: Workflow, ctx: ProviderContext) -> JobSpec:
        """One download command; the output path is added to the artifacts."""
        if not workflow.url:
            fail(workflow, "the curl provider needs a url", hint="add `url: https://…`")
        if not workflow.url.startswith(("http://", "https://", "ftp://")):
            fail(workflow, f"'url' {workflow.url!r} is not an http(s) or ftp URL")
        output = workflow.output or posixpath.basename(workflow.url.split("?")[0].rstrip("/")) or "download"
        command = f"curl -fsSL --retry 3 --create-dirs -o {shlex.quote(output)} {shlex.quote(workflow.url)}"
        spec = base_spec(workflow, self.name, [*workflow.commands, command])
        if not any(a.path == output for a in spec.artifacts):
            spec.artifacts.append(ArtifactSpec(path=output))
        return spec
