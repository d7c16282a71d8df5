"""Providers: the registry and what each built-in makes of a workflow (run with real bash where it can)."""

from __future__ import annotations

import http.server
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import git_repo_with as make_repo

from dstack.errors import ConfigError
from dstack.providers import BUILTIN, get_provider, is_provider, provider_names
from dstack.providers.base import Provider
from dstack.specs import JobSpec
from dstack.workflows import load_project


def run_spec(root: Path, spec: JobSpec) -> subprocess.CompletedProcess[str]:
    """Run a spec's commands like the runner: bash `set -e`, env, working dir, python first on PATH."""
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    env = {**os.environ, **spec.env, "PATH": path, "RUN_NAME": "r", "JOB_ID": "j"}
    for i in range(spec.ports.count):
        env[f"PORT_{i}"] = str(20000 + i)
    return subprocess.run(
        ["bash", "-c", "set -e\n" + "\n".join(spec.commands)],
        cwd=root / spec.working_dir,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def spec_of(tmp_path: Path, workflows: str, name: str = "w", **files: str) -> tuple[Path, JobSpec]:
    root = make_repo(tmp_path, {".dstack/workflows.yaml": workflows, **files})
    return root, load_project(root).job_spec(name)


def test_registry_has_every_builtin() -> None:
    assert set(BUILTIN) == {
        "bash",
        "python",
        "docker",
        "curl",
        "code",
        "lab",
        "notebook",
        "streamlit",
        "fastapi",
        "torchrun",
    }
    for name in BUILTIN:
        provider = get_provider(name)
        assert isinstance(provider, Provider) and provider.name == name
        assert is_provider(name)
    assert provider_names()[: len(BUILTIN)] == list(BUILTIN)
    assert not is_provider("nope")
    with pytest.raises(ConfigError, match="unknown provider 'nope'"):
        get_provider("nope")


def test_bash_runs_with_set_e(tmp_path: Path) -> None:
    root, spec = spec_of(
        tmp_path,
        """\
        workflows:
          - name: w
            commands:
              - echo one
              - "false"
              - echo never
        """,
    )
    done = run_spec(root, spec)
    assert done.returncode == 1 and done.stdout == "one\n"


def test_bash_without_commands(tmp_path: Path) -> None:
    root = make_repo(tmp_path, {".dstack/workflows.yaml": "workflows:\n  - name: w\n    help: nothing\n"})
    with pytest.raises(
        ConfigError, match=r"^\.dstack/workflows\.yaml:2: workflow 'w': nothing to run — add 'commands:'"
    ):
        load_project(root).job_spec("w")


def test_python_provider_runs_the_script(tmp_path: Path) -> None:
    root, spec = spec_of(
        tmp_path,
        """\
        workflows:
          - name: w
            provider: python
            file: "my train.py"
            version: 3.10
            requirements: requirements.txt
            args:
              - --lr
              - ${{ lr }}
              - --name
              - a b
        """,
        **{
            "my train.py": "import sys\nprint(sys.argv[1:])\n",
            ".dstack/variables.yaml": "variables:\n  w:\n    lr: 0.001\n",
        },
    )
    assert spec.commands == ["python 'my train.py' --lr 0.001 --name 'a b'"]
    assert spec.python is not None and spec.python.version == "3.10"
    assert spec.python.requirements == "requirements.txt"
    done = run_spec(root, spec)
    assert done.stdout.strip() == "['--lr', '0.001', '--name', 'a b']"


def test_python_needs_a_script(tmp_path: Path) -> None:
    root = make_repo(tmp_path, {".dstack/workflows.yaml": "workflows:\n  - name: w\n    provider: python\n"})
    with pytest.raises(ConfigError, match="the python provider needs a script — add `script: train.py`"):
        load_project(root).job_spec("w")


def test_docker_with_and_without_commands(tmp_path: Path) -> None:
    root = make_repo(
        tmp_path,
        {
            ".dstack/workflows.yaml": """\
        workflows:
          - name: own
            provider: docker
            image: hello-world
          - name: cmds
            image_name: ubuntu:22.04
            commands:
              - echo hi
          - name: noimage
            provider: docker
            commands: [echo]
        """
        },
    )
    project = load_project(root)
    own = project.job_spec("own")
    assert (own.provider, own.image, own.entrypoint, own.commands) == ("docker", "hello-world", None, [])
    cmds = project.job_spec("cmds")
    assert (cmds.provider, cmds.image, cmds.commands) == ("docker", "ubuntu:22.04", ["echo hi"])
    assert "needs an image" in str(project.error("noimage"))


@pytest.fixture
def http_dir(tmp_path: Path) -> Iterator[str]:
    served = tmp_path / "served"
    served.mkdir()
    (served / "digits.csv").write_text("1,2,3\n")

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a: object, **k: object) -> None:
            super().__init__(*a, directory=str(served), **k)  # type: ignore[arg-type]

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


def test_curl_downloads_into_an_artifact(tmp_path: Path, http_dir: str) -> None:
    root, spec = spec_of(
        tmp_path / "repo",
        f"""\
        workflows:
          - name: w
            provider: curl
            url: {http_dir}/digits.csv
            output: data/digits.csv
        """,
    )
    assert [a.path for a in spec.artifacts] == ["data/digits.csv"]
    done = run_spec(root, spec)
    assert done.returncode == 0, done.stderr
    assert (root / "data" / "digits.csv").read_text() == "1,2,3\n"


@pytest.mark.parametrize(
    "provider,needle",
    [
        ("lab", 'jupyterlab --no-browser --allow-root --ip "${DSTACK_BIND:-127.0.0.1}" --port "$PORT_0"'),
        ("notebook", 'notebook --no-browser --allow-root --ip "${DSTACK_BIND:-127.0.0.1}" --port "$PORT_0"'),
        ("code", '"$ovs" --host "${DSTACK_BIND:-127.0.0.1}" --port "$PORT_0"'),
    ],
)
def test_dev_environments_listen_on_localhost(tmp_path: Path, provider: str, needle: str) -> None:
    _, spec = spec_of(tmp_path, f"workflows:\n  - name: w\n    provider: {provider}\n")
    assert spec.ports.count == 1
    script = "\n".join(spec.commands)
    assert needle in script
    assert "0.0.0.0" not in script
    assert 'echo "' in script and "$DSTACK_TOKEN" in script


def test_app_servers(tmp_path: Path) -> None:
    root = make_repo(
        tmp_path,
        {
            ".dstack/workflows.yaml": """\
        workflows:
          - name: st
            provider: streamlit
            target: app.py
            ports: [8501]
          - name: api
            provider: fastapi
            app: main:app
          - name: broken
            provider: streamlit
        """
        },
    )
    project = load_project(root)
    st = project.job_spec("st")
    assert st.ports.fixed == [8501]
    bind = '"${DSTACK_BIND:-127.0.0.1}"'
    assert f"streamlit run app.py --server.address {bind} --server.port 8501" in st.commands[-1]
    api = project.job_spec("api")
    assert api.commands[-1] == f'python -m uvicorn main:app --host {bind} --port "$PORT_0"'
    assert "needs a target" in str(project.error("broken"))


def test_torchrun(tmp_path: Path) -> None:
    _, spec = spec_of(
        tmp_path,
        """\
        workflows:
          - name: w
            provider: torchrun
            script: train.py
            args: --epochs 2
            resources:
              gpu: 4
        """,
    )
    assert spec.commands == [
        "torchrun --nnodes 1 --nproc_per_node 4 --node_rank 0 --master_addr 127.0.0.1 "
        '--master_port "$PORT_0" '
        "train.py --epochs 2"
    ]
    _, multi = spec_of(
        tmp_path / "m",
        """\
        workflows:
          - name: w
            provider: torchrun
            file: train.py
            nodes: 2
        """,
    )
    assert multi.resources.nodes == 2 and "$NODE_RANK" in multi.commands[0]
    assert any("2 nodes" in n for n in multi.notices)
