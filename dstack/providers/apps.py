"""App servers: `streamlit` (`target`) and `fastapi` (`app`) on `$PORT_0` at 127.0.0.1, with their URLs."""

from __future__ import annotations

import shlex

from dstack.providers.base import Provider, ProviderContext, base_spec, fail, with_definitions
from dstack.providers.devenv import BIND, at_least_one_port, port_ref, url_line
from dstack.specs import JobSpec
from dstack.workflows.models import Workflow


class StreamlitProvider(Provider):
    """`streamlit run TARGET` on 127.0.0.1."""

    name = "streamlit"

    def job_spec(self, workflow: Workflow, ctx: ProviderContext) -> JobSpec:
        """Install streamlit, print the URL, serve `target`."""
        if not workflow.target:
            fail(workflow, "the streamlit provider needs a target", hint="add `target: app.py`")
        spec = at_least_one_port(base_spec(workflow, self.name, []))
        port = port_ref(spec)
        spec.commands = with_definitions(
            [
                *workflow.commands,
                "python -m pip install -q streamlit",
                url_line("Streamlit", port),
                f"python -m streamlit run {shlex.quote(workflow.target)} --server.address {BIND} "
                f"--server.port {port} --server.headless true {workflow.args}".strip(),
            ],
            workflow.variables,
        )
        return spec


class FastapiProvider(Provider):
    """`uvicorn APP` on 127.0.0.1."""

    name = "fastapi"

    def job_spec(self, workflow: Workflow, ctx: ProviderContext) -> JobSpec:
        """Install fastapi and uvicorn, print the URL, serve `app` (module:attribute)."""
        if not workflow.app:
            fail(workflow, "the fastapi provider needs an app", hint="add `app: main:app`")
        spec = at_least_one_port(base_spec(workflow, self.name, []))
        port = port_ref(spec)
        spec.commands = with_definitions(
            [
                *workflow.commands,
                "python -m pip install -q fastapi uvicorn",
                url_line("FastAPI", port, "/docs"),
                f"python -m uvicorn {shlex.quote(workflow.app)} --host {BIND} --port {port} "
                f"{workflow.args}".strip(),
            ],
            workflow.variables,
        )
        return spec
