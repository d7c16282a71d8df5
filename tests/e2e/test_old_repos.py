"""Every `.dstack/` form researchers wrote in 2021–2023, through the real CLI: listed, `--help`, run where it
can run here, a one-line error where it cannot. Folders are written the way people wrote them, not tidied."""

from __future__ import annotations

import http.server
import json
import threading
from pathlib import Path

import pytest
from helpers import dstack


def run_out(repo: Path, *args: str) -> str:
    return dstack("run", *args, cwd=repo).out


def fails(repo: Path, *args: str) -> str:
    res = dstack(*args, cwd=repo, check=False)
    assert res.code != 0, res.out
    assert "Traceback" not in res.err
    return res.err.strip()


def test_layout_workflows_folder_variables_configs_providers_config(make_repo):
    repo = make_repo(
        {
            ".dstack/workflows/data.yaml": "workflows:\n- name: prepare\n  provider: bash\n  commands:\n"
            "  - mkdir -p out && echo $size > out/size.txt\n  artifacts: [out]\n",
            ".dstack/workflows/train.yml": "workflows:\n  - name: train\n    help: Train it\n    deps:\n"
            "      - prepare\n    provider: bash\n    commands:\n"
            "      - echo size=$(cat out/size.txt) lr=$lr seed=$SEED\n",
            ".dstack/configs.yaml": "configs:\n  global:\n    seed: 7\n  train:\n    lr: 0.001\n",
            ".dstack/variables.yaml": "variables:\n  prepare:\n    size: 10\n",
            ".dstack/providers.yaml": "",
            ".dstack/config.yaml": "backend: local\n",
        }
    )
    listing = run_out(repo, "--help")
    assert "prepare" in listing and "train" in listing and "Train it" in listing
    assert "--lr" in run_out(repo, "train", "--help")
    assert "size=10 lr=0.001 seed=7" in run_out(repo, "train")


def test_a_name_defined_twice_names_both_files(make_repo):
    repo = make_repo(
        {
            ".dstack/workflows/a.yaml": "workflows:\n  - name: x\n    commands: [echo a]\n",
            ".dstack/workflows/b.yaml": "workflows:\n  - name: x\n    commands: [echo b]\n",
        }
    )
    err = fails(repo, "run", "x")
    assert "a.yaml" in err and "b.yaml" in err


def test_every_dependency_form(make_repo):
    repo = make_repo(
        {
            ".dstack/workflows.yaml": """\
workflows:
  - name: base
    commands: ["mkdir -p d", "echo base > d/base.txt"]
    artifacts: ["d"]
  - name: by-tag-alone
    depends-on: [":basetag"]
    commands: [cat d/base.txt]
  - name: by-tag-mapping
    deps:
      - tag: basetag
    commands: [cat d/base.txt]
  - name: yaml-mapping-form
    depends-on:
      - base: basetag
    commands: [cat d/base.txt]
  - name: by-workflow-mapping
    depends-on:
      - workflow: base
    commands: [cat d/base.txt]
  - name: repo-and-workflows
    depends-on:
      repo:
        include: ["*.txt"]
      workflows: [base]
    commands: [cat d/base.txt]
  - name: other-repo
    depends-on:
      - workflow: someone/their-repo/prepare
    commands: [echo never]
  - name: typo
    depends-on: [bsae]
    commands: [echo never]
"""
        }
    )
    run_out(repo, "base")
    name = json.loads(dstack("runs", "--json", cwd=repo).out)[0]["name"]
    dstack("tags", "add", "basetag", name, cwd=repo)
    for workflow in (
        "by-tag-alone",
        "by-tag-mapping",
        "yaml-mapping-form",
        "by-workflow-mapping",
        "repo-and-workflows",
    ):
        assert "base" in run_out(repo, workflow), workflow
    assert "not supported" in fails(repo, "run", "other-repo")
    assert "'bsae'" in fails(repo, "run", "typo")
    listing = run_out(repo, "--help")  # the broken ones are listed, marked
    assert "other-repo" in listing and "typo" in listing


def test_environment_mapping_env_list_and_path_references(make_repo, monkeypatch):
    monkeypatch.setenv("MY_TOKEN", "from-my-shell")
    repo = make_repo(
        {
            ".dstack/workflows.yaml": """\
workflows:
  - name: env-map
    environment:
      DEBUG: true
      RATE: 0.50
      EXTRA_PATH: $HOME/bin:$PATH
    commands:
      - echo "debug=$DEBUG rate=$RATE"
      - 'case "$EXTRA_PATH" in *:/*) echo path-expanded ;; esac'
  - name: env-list
    env:
      - MODE=fast
      - MY_TOKEN
    commands: ['echo "mode=$MODE token=$MY_TOKEN"']
"""
        }
    )
    out = run_out(repo, "env-map")
    assert "debug=true rate=0.50" in out and "path-expanded" in out
    assert "mode=fast token=from-my-shell" in run_out(repo, "env-list")


def test_python_version_scalars_read_as_written(make_repo):
    repo = make_repo(
        {
            ".dstack/workflows.yaml": """\
workflows:
  - name: py
    provider: python
    version: 3.10
    script: show.py
  - name: schema-minded
    provider: python
    python:
      type: string
      default: 3.9
    file: show.py
""",
            "show.py": "import sys\nprint('python', sys.version_info[:2])\n",
        }
    )
    out = dstack("run", "py", cwd=repo)
    assert "3.10" in out.output  # ran python3.10, or said it used another python in its place
    assert "3.1 " not in out.output and "python3.1:" not in out.output
    assert "3.9" in dstack("run", "schema-minded", cwd=repo).output


def test_resources_forms(make_repo):
    repo = make_repo(
        {
            ".dstack/workflows.yaml": """\
workflows:
  - name: small
    resources:
      cpu: 1
      memory: 512MB
      shm_size: 64MB
      interruptible: false
      local: true
    commands: [echo small]
  - name: top-level-gpu
    GPU: 2
    commands: [echo never]
  - name: short-form
    resources:
      v100/gpu: 1
    commands: [echo never]
  - name: gpu-string
    resources: {gpu: A100}
    commands: [echo never]
"""
        }
    )
    assert "small" in run_out(repo, "small")
    for workflow, what in (
        ("top-level-gpu", "GPUs (2 asked"),
        ("short-form", "GPUs (1 v100 asked"),
        ("gpu-string", "GPUs (1 A100 asked"),
    ):
        err = fails(repo, "run", workflow)
        assert "no runner could ever fit" in err and what in err, err


def test_ports_count_and_list(make_repo):
    repo = make_repo(
        {
            ".dstack/workflows.yaml": """\
workflows:
  - name: two-ports
    ports: 2
    commands: ['test -n "$PORT_0" && test -n "$PORT_1" && echo ports-ok']
"""
        }
    )
    assert "ports-ok" in run_out(repo, "two-ports")


@pytest.fixture
def http_file(tmp_path):
    (tmp_path / "www").mkdir()
    (tmp_path / "www" / "weights.bin").write_bytes(b"w" * 1000)

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **kw):
            super().__init__(*a, directory=str(tmp_path / "www"), **kw)

        def log_message(self, *a):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/weights.bin"
    server.shutdown()
    server.server_close()
    thread.join(5)


def test_providers_curl_and_refused_forms(make_repo, http_file, tmp_path):
    repo = make_repo(
        {
            ".dstack/workflows.yaml": f"""\
workflows:
  - name: download
    provider: curl
    url: {http_file}
    output: weights.bin
  - name: old-python
    provider: python3.9
    script: x.py
  - name: pinned
    provider: python==3.8
    script: x.py
"""
        }
    )
    run_out(repo, "download")
    name = json.loads(dstack("runs", "--json", cwd=repo).out)[0]["name"]
    dstack("artifacts", "download", name, "-o", str(tmp_path / "got"), cwd=repo)
    assert (tmp_path / "got/weights.bin").read_bytes() == b"w" * 1000
    assert "version" in fails(repo, "run", "old-python")
    assert "version" in fails(repo, "run", "pinned")


def test_help_template_args_triggers_absolute_artifacts(make_repo, tmp_path):
    repo = make_repo(
        {
            ".dstack/workflows.yaml": """\
templates:
  - name: base
    provider: bash
    environment:
      FROM_TEMPLATE: yes-it-is
workflows:
  - name: templated
    help: Uses a template
    template: base
    triggers:
      - push
    commands:
      - 'echo "template=$FROM_TEMPLATE args=${{ run.args }} vars=$variables_as_args"'
      - mkdir -p out && echo done > out/x.txt
    artifacts:
      - out
"""
        }
    )
    res = dstack("run", "templated", "--", "--epochs", "3", cwd=repo)
    assert "template=yes-it-is args=--epochs 3" in res.out
    assert "trigger" in res.err.lower()
    assert "Uses a template" in run_out(repo, "--help")


@pytest.mark.parametrize(
    "body, message",
    [
        ("workflows:\n  - id: old\n    params: {a: 1}\n    dependencies: []\n", "name"),
        ("workflows:\n  - name: a\n    commands: [echo a]\n    commands: [echo b]\n", "duplicate"),
        ("workflows:\n  - name: a\n    comands: [echo a]\n", "did you mean 'commands'"),
        ("workflows:\n  - name: a\n    commands: [echo a]\n    artifacts: [null]\n", "artifacts"),
        ("workflows: [\n  - name: a\n", ".dstack/workflows.yaml:"),
    ],
)
def test_broken_files_get_one_line_errors_and_validate_lists_them(make_repo, body, message):
    repo = make_repo({".dstack/workflows.yaml": body})
    res = dstack("validate", cwd=repo, check=False)
    assert res.code != 0 and message in res.err, res.err
    problems = json.loads(dstack("validate", "--json", cwd=repo, check=False).out)
    assert problems and all(p["file"] for p in problems)
    name = "old" if "id: old" in body else "a"
    err = fails(repo, "run", name)
    assert len(err.splitlines()) == 1 and ".dstack/workflows.yaml" in err
