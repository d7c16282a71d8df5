"""Issue 10: every `.dstack/` form researchers wrote 2021–2023, written the messy way they wrote it."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from helpers import git_repo_with as make_repo

from dstack.specs import DependencySpec, JobSpec
from dstack.workflows import load_project


def run_spec(root: Path, spec: JobSpec, extra_env: dict[str, str] | None = None) -> str:
    """Run a spec's commands like the runner: bash `set -e` in its working dir with its env."""
    env = {**os.environ, **(extra_env or {}), **spec.env, "RUN_NAME": "r1", "JOB_ID": "j1"}
    done = subprocess.run(
        ["bash", "-c", "set -e\n" + "\n".join(spec.commands)],
        cwd=root / spec.working_dir,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


# 1. Layout ---------------------------------------------------------------------------------------


def test_workflows_folder_with_several_files(tmp_path: Path) -> None:
    root = make_repo(
        tmp_path,
        {
            ".dstack/workflows/data.yaml": """\
            workflows:
            - name: download
              commands:
              - echo downloading
            """,
            ".dstack/workflows/train.yml": """\
            workflows:
                - name: train
                  depends-on: [download]
                  commands: ["echo training"]
            """,
            ".dstack/providers.yaml": "",
            ".dstack/config.yaml": "backend: aws\nbucket: dstack-artifacts-123\nregion: us-east-1\n",
        },
    )
    project = load_project(root)
    assert project.names() == ["download", "train"]
    assert run_spec(root, project.job_spec("train")) == "training\n"
    assert project.settings.bucket == "dstack-artifacts-123"
    assert project.validate() == []


def test_name_defined_twice_names_both_files(tmp_path: Path) -> None:
    root = make_repo(
        tmp_path,
        {
            ".dstack/workflows.yaml": "workflows:\n  - name: train\n    commands: [echo a]\n",
            ".dstack/workflows/more.yaml": "workflows:\n  - name: other\n    commands: [echo]\n"
            "  - name: train\n    commands: [echo b]\n",
        },
    )
    project = load_project(root)
    assert project.names() == ["train", "other"]
    assert project.error("other") is None
    assert str(project.error("train")) == (
        ".dstack/workflows/more.yaml:4: workflow 'train' is defined twice: .dstack/workflows.yaml:2 and "
        ".dstack/workflows/more.yaml:4 — rename or remove one of them"
    )


# 2. Dependencies ---------------------------------------------------------------------------------

DEPS = """\
workflows:
  - name: prepare
    commands: [echo prep]
  - name: every-form
    deps:
      - prepare
      - prepare:latest
      - :best-model
      - tag: pretrained
      - workflow: prepare
      - prepare: v2
    commands: [echo]
  - name: mapping-form
    depends-on:
      repo:
        include:
          - "data/*.csv"
          - src/**
      workflows:
        - prepare
    commands: [echo]
  - name: other-repo
    depends-on:
      - workflow: dstackai/dstack-examples/mnist-data
    commands: [echo]
  - name: both
    deps: [prepare]
    depends-on: [prepare]
    commands: [echo]
"""


def test_every_dependency_form(tmp_path: Path) -> None:
    project = load_project(make_repo(tmp_path, {".dstack/workflows.yaml": DEPS}))
    assert project.job_spec("every-form").depends_on == [
        DependencySpec(workflow="prepare"),
        DependencySpec(workflow="prepare", tag="latest"),
        DependencySpec(tag="best-model"),
        DependencySpec(tag="pretrained"),
        DependencySpec(workflow="prepare"),
        DependencySpec(workflow="prepare", tag="v2"),
    ]
    spec = project.job_spec("mapping-form")
    assert spec.depends_on == [DependencySpec(workflow="prepare")]
    assert spec.repo_include == ["data/*.csv", "src/**"]


def test_other_repository_fails_only_that_workflow(tmp_path: Path) -> None:
    project = load_project(make_repo(tmp_path, {".dstack/workflows.yaml": DEPS}))
    assert project.error("prepare") is None
    assert str(project.error("other-repo")) == (
        ".dstack/workflows.yaml:24: 'dstackai/dstack-examples/mnist-data' is another repository's workflow: "
        "not supported — copy that workflow into this repo, or depend on a tag of its run"
    )
    assert "'depends-on' and 'deps' both set" in str(project.error("both"))


# 3. Environment ----------------------------------------------------------------------------------


def test_environment_mapping_and_env_list(tmp_path: Path) -> None:
    root = make_repo(
        tmp_path,
        {
            ".dstack/workflows.yaml": """\
        workflows:
          - name: map
            environment:
              DEBUG: true
              EPOCHS: 10
              RATIO: 0.50
              PYTHONPATH: $PATH:src
            commands:
              - echo $DEBUG $EPOCHS $RATIO
          - name: list
            env:
              - WANDB_MODE=offline
              - HF_TOKEN
              - EMPTY=
            commands:
              - echo "$WANDB_MODE $HF_TOKEN [$EMPTY]"
        """
        },
    )
    project = load_project(root)
    spec = project.job_spec("map")
    assert spec.env == {"DEBUG": "true", "EPOCHS": "10", "RATIO": "0.50", "PYTHONPATH": "$PATH:src"}
    assert run_spec(root, spec) == "true 10 0.50\n"
    spec = project.job_spec("list")
    assert spec.env == {"WANDB_MODE": "offline", "EMPTY": ""}
    assert spec.passthrough_env == ["HF_TOKEN"]
    assert run_spec(root, spec, {"HF_TOKEN": "mine"}) == "offline mine []\n"


# 4. Scalars as written ---------------------------------------------------------------------------


def test_python_versions_read_as_written(tmp_path: Path) -> None:
    project = load_project(
        make_repo(
            tmp_path,
            {
                ".dstack/workflows.yaml": """\
        workflows:
          - name: a
            provider: python
            python: 3.10
            script: a.py
          - name: b
            provider: python
            version: 3.10
            python_script: b.py
          - name: c
            provider: python
            python:
              type: string
              default: 3.9
            script: c.py
          - name: d
            provider: python
            version: "3.11"
            script: d.py
          - name: bad
            provider: python
            version: latest
            script: d.py
        """
            },
        )
    )
    versions = [project.job_spec(n).python.version for n in "abcd"]  # type: ignore[union-attr]
    assert versions == ["3.10", "3.10", "3.9", "3.11"]
    assert "'version' 'latest' is not a Python version" in str(project.error("bad"))


# 5. Resources ------------------------------------------------------------------------------------


def test_every_resources_form(tmp_path: Path) -> None:
    project = load_project(
        make_repo(
            tmp_path,
            {
                ".dstack/workflows.yaml": """\
        workflows:
          - name: full
            commands: [nvidia-smi]
            resources:
              cpu: 8
              memory: 64GB
              shm_size: 8GB
              GPU:
                count: 2
                name: A100
                memory: 40GB
              interruptible: true
              nodes: 1
          - name: short
            commands: [echo]
            resources:
              v100/gpu: 2
              memory: 1.5GiB
          - name: named
            commands: [echo]
            resources:
              gpu: "A100"
              memory: 512MB
          - name: toplevel
            commands: [echo]
            gpu: 1
            nodes: 2
          - name: local
            commands: [echo]
            resources:
              local: true
              remote: false
          - name: bad-memory
            commands: [echo]
            resources:
              memory: lots
        """
            },
        )
    )
    full = project.job_spec("full").resources
    assert (full.cpu, full.memory_mib, full.shm_size_mib, full.interruptible) == (8, 65536, 8192, True)
    assert (full.gpu.count, full.gpu.name, full.gpu.memory_mib) == (2, "A100", 40960)
    short = project.job_spec("short").resources
    assert (short.gpu.count, short.gpu.name, short.memory_mib) == (2, "v100", 1536)
    named = project.job_spec("named").resources
    assert (named.gpu.count, named.gpu.name, named.memory_mib) == (1, "A100", 512)
    top = project.job_spec("toplevel").resources
    assert (top.gpu.count, top.nodes) == (1, 2)
    assert project.job_spec("local").resources.local is True
    assert str(project.error("bad-memory")) == (
        ".dstack/workflows.yaml:36: 'resources.memory' 'lots' is not a size — "
        "write e.g. 64GB, 512MB or 1.5GiB"
    )


# 6. Ports ----------------------------------------------------------------------------------------


def test_ports_count_and_list(tmp_path: Path) -> None:
    root = make_repo(
        tmp_path,
        {
            ".dstack/workflows.yaml": """\
        workflows:
          - name: count
            ports: 2
            commands:
              - echo "serving on $PORT_0 and $PORT_1"
          - name: fixed
            ports:
              - 8888
              - 6006
            commands: [echo]
          - name: bad
            ports: [http]
            commands: [echo]
        """
        },
    )
    project = load_project(root)
    spec = project.job_spec("count")
    assert spec.ports.count == 2
    assert run_spec(root, spec, {"PORT_0": "3000", "PORT_1": "3001"}) == "serving on 3000 and 3001\n"
    assert project.job_spec("fixed").ports.fixed == [8888, 6006]
    assert "'ports[0]' 'http' is not a port number" in str(project.error("bad"))


# 7. Providers ------------------------------------------------------------------------------------


def test_image_without_provider_is_docker(tmp_path: Path) -> None:
    project = load_project(
        make_repo(
            tmp_path,
            {
                ".dstack/workflows.yaml": """\
        workflows:
          - name: w
            image: pytorch/pytorch:2.0.1-cuda11.7-cudnn8-runtime
            commands:
              - python -c "import torch"
        """
            },
        )
    )
    spec = project.job_spec("w")
    assert (spec.provider, spec.image) == ("docker", "pytorch/pytorch:2.0.1-cuda11.7-cudnn8-runtime")


def test_custom_provider_shadows_builtin_and_says_so(tmp_path: Path) -> None:
    root = make_repo(
        tmp_path,
        {
            ".dstack/providers.yaml": """\
            providers:
              - name: python
                image: python:3.9-slim
                commands:
                  - echo custom ${{ lr }}
              - name: conda
                commands: [echo conda]
            """,
            ".dstack/variables.yaml": "variables:\n  global:\n    lr: 1e-3\n",
            ".dstack/workflows.yaml": """\
            workflows:
              - name: w
                provider: python
                commands:
                  - echo mine
              - name: c
                provider: conda
                commands: [echo after]
            """,
        },
    )
    project = load_project(root)
    spec = project.job_spec("w")
    assert spec.image == "python:3.9-slim"
    assert spec.commands == ["DSTACK_VAR_lr=1e-3", 'echo custom "${DSTACK_VAR_lr}"', "echo mine"]
    assert spec.notices == ["provider 'python' comes from .dstack/providers.yaml:2, not the built-in one"]
    c = project.job_spec("c")
    assert run_spec(root, c) == "conda\nafter\n" and c.notices == []


@pytest.mark.parametrize(
    "written,message",
    [
        ("python3.9", "'python3.9' is not a provider — write `provider: python` and `version: 3.9`"),
        ("python==3.8", "'python==3.8' is not a provider — write `provider: python` and `version: 3.8`"),
        (
            "torchrun@main",
            "provider versions and branches ('torchrun@main') are not supported — write `provider: torchrun`",
        ),
        ("[bash, python]", "'provider' takes one name, not a list — write e.g. `provider: python`"),
        (
            "{repo: 'https://github.com/x/p', name: tensorboard}",
            "providers from a repository (https://github.com/x/p) are not supported — "
            "define 'tensorboard' in "
            ".dstack/providers.yaml (name, image, commands) and write `provider: tensorboard`",
        ),
        ("pyton", "unknown provider 'pyton' — did you mean 'python'?"),
    ],
)
def test_provider_forms_refused_with_a_fix(tmp_path: Path, written: str, message: str) -> None:
    root = make_repo(
        tmp_path,
        {
            ".dstack/workflows.yaml": f"""\
        workflows:
          - name: w
            provider: {written}
            script: train.py
        """
        },
    )
    assert str(load_project(root).error("w")) == f".dstack/workflows.yaml:3: {message}"


# 8. Everything else ------------------------------------------------------------------------------


def test_help_template_artifacts_args_triggers(tmp_path: Path) -> None:
    root = make_repo(
        tmp_path,
        {
            ".dstack/workflows.yaml": """\
            templates:
              - name: gpu-box
                image: nvidia/cuda:12.1.0-base-ubuntu22.04
                resources:
                  gpu: 1
            workflows:
              - name: base
                commands: [echo base]
                environment:
                  A: "1"
              - name: train
                help: Train the model (pass extra args after the name)
                template: gpu-box
                commands:
                  - echo $variables_as_args ${{ run.args }}
                artifacts:
                  - checkpoints
                  - /tmp/scratch
                  - path: logs
                    mount: true
                  - path: tb
                    real-time: true
                triggers:
                  - cron: "0 * * * *"
              - name: derived
                template: base
                commands: [echo derived $A]
            """,
            ".dstack/variables.yaml": "variables:\n  train:\n    epochs: 5\n",
        },
    )
    project = load_project(root)
    assert project.help("train") == "Train the model (pass extra args after the name)"
    assert project.triggers("train") == [{"cron": "0 * * * *"}]
    spec = project.job_spec("train", args=["--fast", "x y"])
    assert spec.image == "nvidia/cuda:12.1.0-base-ubuntu22.04" and spec.resources.gpu.count == 1
    assert [(a.path, a.mount, a.real_time) for a in spec.artifacts] == [
        ("checkpoints", False, False),
        ("/tmp/scratch", False, False),
        ("logs", True, False),
        ("tb", False, True),
    ]
    assert spec.notices == [
        "workflow 'train' has triggers: `dstack triggers install` makes them start runs "
        "(`dstack triggers` shows what is installed)"
    ]
    out = run_spec(root, spec.model_copy(update={"image": None}))
    assert out == "--epochs 5 --fast x y\n"
    derived = project.job_spec("derived")
    assert run_spec(root, derived) == "derived 1\n"


def test_pre_release_syntax_names_the_renames_but_dependencies_is_read(tmp_path: Path) -> None:
    root = make_repo(
        tmp_path,
        {
            ".dstack/workflows.yaml": """\
        workflows:
        - id: train
          params:
            lr: 0.1
          dependencies: [prepare]
          commands: [python train.py]
        """
        },
    )
    project = load_project(root)
    assert project.names() == ["train"]
    assert str(project.error("train")) == (
        ".dstack/workflows.yaml:2: pre-release syntax ('id', 'params') — "
        "rename 'id' to 'name'; move 'params' to .dstack/variables.yaml under the workflow's name"
    )


@pytest.mark.parametrize(
    "body,message",
    [
        (
            "    commands: [echo]\n    artifacts:\n      -\n",
            ".dstack/workflows.yaml:5: empty item in 'artifacts' — remove the bare '-' line or give a path",
        ),
        (
            "    commands:\n      - echo a\n      -\n",
            ".dstack/workflows.yaml:5: empty item in 'commands' — remove the bare '-' line or write a value",
        ),
        (
            "    comands: [echo]\n",
            ".dstack/workflows.yaml:3: unknown field 'comands' — did you mean 'commands'?",
        ),
        (
            "    commands: [echo a]\n    help: x\n    commands: [echo b]\n",
            ".dstack/workflows.yaml:5: duplicate key 'commands' (first at line 3) — "
            "YAML keeps only the last one: "
            "remove or rename one of them",
        ),
        (
            "    commands:\n      - echo result: done\n",
            ".dstack/workflows.yaml:4: 'commands[0]' must be a string — "
            "quote lines that contain ': ' so YAML doesn't "
            "read a mapping",
        ),
        (
            "    commands: [echo]\n    depends-on:\n      - \n",
            ".dstack/workflows.yaml:5: empty item in 'depends-on' — "
            "remove the bare '-' line or name a workflow",
        ),
    ],
)
def test_messy_entries_get_one_line_errors(tmp_path: Path, body: str, message: str) -> None:
    root = make_repo(
        tmp_path,
        {
            ".dstack/workflows.yaml": "workflows:\n  - name: w\n"
            + body
            + "  - name: ok\n    commands: [echo ok]\n"
        },
    )
    project = load_project(root)
    assert project.names() == ["w", "ok"]
    assert str(project.error("w")) == message
    assert project.error("ok") is None


def test_not_yaml_at_all(tmp_path: Path) -> None:
    root = make_repo(tmp_path, {".dstack/workflows.yaml": "workflows:\n\t- name: w\n"})
    (error,) = load_project(root).validate()
    assert error.file == ".dstack/workflows.yaml" and error.line == 2
    assert "\n" not in str(error)


def test_anchors_retry_and_working_dir(tmp_path: Path) -> None:
    root = make_repo(
        tmp_path,
        {
            ".dstack/workflows.yaml": """\
                x-defaults: &defaults
                  working_dir: src
                  retry:
                    limit: 2
                    on: [error]
                workflows:
                  - name: a
                    <<: *defaults
                    commands: [pwd]
                  - name: b
                    <<: *defaults
                    retry: 3
                    Gpu: 1
                    commands: [echo]
                  - name: escape
                    working_dir: ../elsewhere
                    commands: [echo]
                """,
            "src/.keep": "",
        },
    )
    project = load_project(root)
    assert project.load_errors() == []
    a = project.job_spec("a")
    assert a.retry is not None and (a.retry.limit, a.retry.on) == (2, ["error"])
    assert run_spec(root, a).strip().endswith("/src")
    b = project.job_spec("b")
    assert b.retry is not None and b.retry.limit == 3 and b.resources.gpu.count == 1
    assert "'working_dir' '../elsewhere' is outside the repo" in str(project.error("escape"))
