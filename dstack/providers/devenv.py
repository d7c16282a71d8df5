"""Dev environments: `code` (VS Code server), `lab` (JupyterLab), `notebook` (Jupyter Notebook).

Each serves on `$PORT_0` bound to 127.0.0.1 (reached through SSH forwarding, never opened to the world)
and prints its URL with a fresh token.
"""

from __future__ import annotations

from dstack.providers.base import Provider, ProviderContext, base_spec, with_definitions
from dstack.specs import JobSpec
from dstack.workflows.models import Workflow

TOKEN = "DSTACK_TOKEN=$(python3 -c 'import secrets; print(secrets.token_urlsafe(24))')"


def at_least_one_port(spec: JobSpec) -> JobSpec:
    """Servers need `$PORT_0`: ask for one port unless the workflow asked for some."""
    if spec.ports.count == 0 and not spec.ports.fixed:
        spec.ports.count = 1
    return spec


def port_ref(spec: JobSpec) -> str:
    """The port the server listens on: the first fixed port, else `$PORT_0`."""
    return str(spec.ports.fixed[0]) if spec.ports.fixed else '"$PORT_0"'


class _Server(Provider):
    def server_commands(self, workflow: Workflow, port: str) -> list[str]:
        raise NotImplementedError

    def job_spec(self, workflow: Workflow, ctx: ProviderContext) -> JobSpec:
        """Setup commands first, then the server in the foreground."""
        spec = at_least_one_port(base_spec(workflow, self.name, []))
        spec.commands = with_definitions(
            [*workflow.commands, *self.server_commands(workflow, port_ref(spec))], workflow.variables
        )
        return spec


class LabProvider(_Server):
    """JupyterLab."""

    name = "lab"

    def server_commands(self, workflow: Workflow, port: str) -> list[str]:
        """Install JupyterLab into the job's venv, then serve it."""
        return [
            "python -m pip install -q jupyterlab",
            TOKEN,
            f'echo "JupyterLab: http://127.0.0.1:{port.strip(chr(34))}/lab?token=$DSTACK_TOKEN"',
            f"python -m jupyterlab --no-browser --allow-root --ip 127.0.0.1 --port {port} "
            '--ServerApp.token="$DSTACK_TOKEN"',
        ]


class NotebookProvider(_Server):
    """Jupyter Notebook."""

    name = "notebook"

    def server_commands(self, workflow: Workflow, port: str) -> list[str]:
        """Install Jupyter Notebook into the job's venv, then serve it."""
        return [
            "python -m pip install -q notebook",
            TOKEN,
            f'echo "Jupyter Notebook: http://127.0.0.1:{port.strip(chr(34))}/?token=$DSTACK_TOKEN"',
            f"python -m notebook --no-browser --allow-root --ip 127.0.0.1 --port {port} "
            '--ServerApp.token="$DSTACK_TOKEN" --NotebookApp.token="$DSTACK_TOKEN"',
        ]


class CodeProvider(_Server):
    """VS Code in the browser: openvscode-server, or code-server, from the host or the image."""

    name = "code"

    def server_commands(self, workflow: Workflow, port: str) -> list[str]:
        """Serve with whichever VS Code server is installed; say what to install when none is."""
        p = port.strip('"')
        return [
            TOKEN,
            "if command -v openvscode-server >/dev/null; then "
            f'echo "VS Code: http://127.0.0.1:{p}/?tkn=$DSTACK_TOKEN"; '
            f'openvscode-server --host 127.0.0.1 --port {port} --connection-token "$DSTACK_TOKEN" '
            "--without-connection-token-file .; "
            "elif command -v code-server >/dev/null; then "
            f'echo "VS Code: http://127.0.0.1:{p}/ (password: $DSTACK_TOKEN)"; '
            f'PASSWORD="$DSTACK_TOKEN" code-server --auth password --bind-addr 127.0.0.1:{p} .; '
            "else echo 'the code provider needs openvscode-server or code-server on the host, "
            "or an image that has one (image: gitpod/openvscode-server)' >&2; exit 127; fi",
        ]
