"""Dev environments: `code` (VS Code server), `lab` (JupyterLab), `notebook` (Jupyter Notebook).

Each serves on `$PORT_0` bound to 127.0.0.1 (`$DSTACK_BIND` in a container, whose port is published on
the host's 127.0.0.1 only), reached through the SSH connection dstack holds, and prints its
`http://localhost:PORT` URL with a token made when the job starts (so it is in no saved spec or state).
Jupyter is installed from PyPI into a venv cached on the runner; a dev environment stops after
`DEFAULT_INACTIVITY_S` without a connection unless the workflow says otherwise (`inactivity: off`).
"""

from __future__ import annotations

import shlex

from dstack.providers.base import Provider, ProviderContext, base_spec, with_definitions
from dstack.specs import JobSpec
from dstack.workflows.models import Workflow

TOKEN = "DSTACK_TOKEN=$(python3 -c 'import secrets; print(secrets.token_urlsafe(24))')"
BIND = '"${DSTACK_BIND:-127.0.0.1}"'
DEFAULT_INACTIVITY_S = 3600.0
OPENVSCODE_VERSION = "1.95.3"


def at_least_one_port(spec: JobSpec) -> JobSpec:
    """Servers need `$PORT_0`: ask for one port unless the workflow asked for some."""
    if spec.ports.count == 0 and not spec.ports.fixed:
        spec.ports.count = 1
    return spec


def port_ref(spec: JobSpec) -> str:
    """The port the server listens on: the first fixed port, else `$PORT_0`."""
    return str(spec.ports.fixed[0]) if spec.ports.fixed else '"$PORT_0"'


def url_line(label: str, port: str, path: str = "") -> str:
    """`echo` of the server's localhost URL (dstack rewrites the port where the forward got another one)."""
    return f'echo "{label}: http://localhost:{port.strip(chr(34))}{path}"'


def cached_venv(name: str, packages: list[str]) -> list[str]:
    """Shell lines: a venv with `packages` from PyPI, made once per python version on the runner (flock'd,
    next to the requirements venvs), first on PATH."""
    pkgs = " ".join(shlex.quote(p) for p in packages)
    return [
        "py=$(command -v python || command -v python3)",
        'ver=$("$py" -c \'import sys; print("%d.%d" % sys.version_info[:2])\')',
        f'venv="${{DSTACK_VENVS:-$HOME/.dstack/venvs}}/{name}-py$ver"',
        'mkdir -p "$(dirname "$venv")"',
        '( flock 9 2>/dev/null || :; if [ ! -e "$venv/.ready" ]; then rm -rf "$venv";'
        f' echo "dstack: installing {name} from PyPI (cached for next runs)" >&2;'
        ' { "$py" -m venv --system-site-packages "$venv" || { echo "dstack: $py cannot make a venv on'
        ' $(hostname): install python3-venv there" >&2; exit 1; }; } &&'
        f' "$venv/bin/python" -m pip install -q --disable-pip-version-check {pkgs} &&'
        ' touch "$venv/.ready"; fi ) 9>"$venv.lock"',
        'export VIRTUAL_ENV="$venv" PATH="$venv/bin:$PATH"',
    ]


class _Server(Provider):
    def server_commands(self, workflow: Workflow, port: str) -> list[str]:
        raise NotImplementedError

    def job_spec(self, workflow: Workflow, ctx: ProviderContext) -> JobSpec:
        """Setup commands first, then the server in the foreground; idle ones stop after an hour."""
        spec = at_least_one_port(base_spec(workflow, self.name, []))
        spec.commands = with_definitions(
            [*workflow.commands, *self.server_commands(workflow, port_ref(spec))], workflow.variables
        )
        if spec.inactivity_s is None:
            spec.inactivity_s = DEFAULT_INACTIVITY_S
        return spec


class LabProvider(_Server):
    """JupyterLab."""

    name = "lab"

    def server_commands(self, workflow: Workflow, port: str) -> list[str]:
        """Install JupyterLab into the cached venv, then serve it with a fresh token."""
        return [
            *cached_venv("jupyterlab", ["jupyterlab"]),
            TOKEN,
            url_line("JupyterLab", port, "/lab?token=$DSTACK_TOKEN"),
            f'JUPYTER_TOKEN="$DSTACK_TOKEN" exec python -m jupyterlab --no-browser --allow-root --ip {BIND} '
            f"--port {port} --ServerApp.port_retries=0",
        ]


class NotebookProvider(_Server):
    """Jupyter Notebook."""

    name = "notebook"

    def server_commands(self, workflow: Workflow, port: str) -> list[str]:
        """Install Jupyter Notebook into the cached venv, then serve it with a fresh token."""
        return [
            *cached_venv("notebook", ["notebook"]),
            TOKEN,
            url_line("Jupyter Notebook", port, "/tree?token=$DSTACK_TOKEN"),
            f'JUPYTER_TOKEN="$DSTACK_TOKEN" exec python -m notebook --no-browser --allow-root --ip {BIND} '
            f"--port {port} --ServerApp.port_retries=0",
        ]


class CodeProvider(_Server):
    """VS Code in the browser: openvscode-server (on PATH, cached, or fetched once), else code-server."""

    name = "code"

    def server_commands(self, workflow: Workflow, port: str) -> list[str]:
        """Find or fetch openvscode-server; say in one line how to pre-install it where it can't be."""
        v = OPENVSCODE_VERSION
        release = f"openvscode-server-v{v}-linux-$arch"
        url = f"https://github.com/gitpod-io/openvscode-server/releases/download/openvscode-server-v{v}/{release}.tar.gz"
        tools = "${DSTACK_TOOLS:-$HOME/.dstack/tools}"
        return [
            TOKEN,
            'case "$(uname -m)" in aarch64|arm64) arch=arm64;; *) arch=x64;; esac',
            f'ovs="{tools}/{release}/bin/openvscode-server"',
            "if command -v openvscode-server >/dev/null; then ovs=$(command -v openvscode-server); fi",
            'if [ ! -x "$ovs" ] && ! command -v code-server >/dev/null; then'
            f' mkdir -p "{tools}" && {{ curl -fsSL --connect-timeout 10 --max-time 300 "{url}" 2>/dev/null ||'
            f' wget -q -T 20 -O - "{url}" 2>/dev/null; }} | tar -xz -C "{tools}" 2>/dev/null ||'
            ' { echo "dstack: cannot fetch openvscode-server on $(hostname): put it on PATH there, or unpack'
            f' {release}.tar.gz (its GitHub release) into ${{DSTACK_TOOLS:-~/.dstack/tools}}/" >&2;'
            " exit 127; }; fi",
            'if [ -x "$ovs" ]; then'
            ' tkn="${DSTACK_JOB_DIR:-/tmp}/vscode-token"; umask 077; printf %s "$DSTACK_TOKEN" > "$tkn";'
            f" {url_line('VS Code', port, '/?tkn=$DSTACK_TOKEN')};"
            f' exec "$ovs" --host {BIND} --port {port} --connection-token-file "$tkn" .;'
            " fi",
            f'{url_line("VS Code", port, "/")}; echo "password: $DSTACK_TOKEN"',
            f'PASSWORD="$DSTACK_TOKEN" exec code-server --auth password --bind-addr {BIND.rstrip(chr(34))}:'
            f'{port.strip(chr(34))}" .',
        ]
