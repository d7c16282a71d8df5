"""Reading `.dstack/`: finding it, the file layout, errors with file:line, the schema."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import git_repo_with as make_repo

from dstack.errors import ConfigError, RepoError, UsageError
from dstack.workflows import json_schema, load_project

BASIC = """\
workflows:
  - name: prepare
    help: Prepare the digits data set
    commands:
      - python prepare.py
    artifacts:
      - data
  - name: train
    provider: python
    script: train.py
    depends-on:
      - prepare
"""


def test_finds_dstack_folder_from_a_subfolder(tmp_path: Path) -> None:
    root = make_repo(tmp_path / "repo", {".dstack/workflows.yaml": BASIC, "src/x/keep": ""})
    project = load_project(root / "src" / "x")
    assert project.root == root.resolve()
    assert project.names() == ["prepare", "train"]
    assert project.help("prepare") == "Prepare the digits data set"
    assert project.help("train") is None


def test_stops_at_the_git_root(tmp_path: Path) -> None:
    make_repo(tmp_path, {".dstack/workflows.yaml": BASIC})
    inner = make_repo(tmp_path / "inner", {"README": "x"})
    with pytest.raises(RepoError, match=r"no \.dstack/ folder in .*inner or above — run `dstack init`"):
        load_project(inner)


def test_no_dstack_folder(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "r", {"a.txt": ""})
    with pytest.raises(RepoError) as e:
        load_project(repo)
    assert e.value.exit_code == 2


def test_state_home_is_not_a_project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "home"
    (home / ".dstack").mkdir(parents=True)
    (home / ".dstack" / "state.sqlite").write_text("")
    monkeypatch.setenv("DSTACK_HOME", str(home / ".dstack"))
    (home / "work").mkdir()
    with pytest.raises(RepoError):
        load_project(home / "work")


def test_unknown_field_names_line_and_suggests(tmp_path: Path) -> None:
    root = make_repo(
        tmp_path,
        {
            ".dstack/workflows.yaml": """\
        workflows:
          - name: ok
            commands: [echo ok]
          - name: bad
            commands:
              - echo hi
            artifact:
              - out
        """
        },
    )
    project = load_project(root)
    assert project.names() == ["ok", "bad"]
    assert project.error("ok") is None
    error = project.error("bad")
    assert isinstance(error, ConfigError)
    assert str(error) == ".dstack/workflows.yaml:7: unknown field 'artifact' — did you mean 'artifacts'?"
    assert error.exit_code == 2
    with pytest.raises(ConfigError, match="unknown field 'artifact'"):
        project.job_spec("bad")
    assert project.job_spec("ok").commands == ["echo ok"]


def test_unknown_nested_field(tmp_path: Path) -> None:
    root = make_repo(
        tmp_path,
        {
            ".dstack/workflows.yaml": """\
        workflows:
          - name: w
            commands: [echo]
            resources:
              memroy: 8GB
        """
        },
    )
    assert str(load_project(root).error("w")) == (
        ".dstack/workflows.yaml:5: unknown field 'resources.memroy' — did you mean 'memory'?"
    )


def test_wrong_type_names_field_and_line(tmp_path: Path) -> None:
    root = make_repo(
        tmp_path,
        {
            ".dstack/workflows.yaml": """\
        workflows:
          - name: w
            commands: [echo]
            resources:
              cpu: lots
        """
        },
    )
    error = load_project(root).error("w")
    assert error is not None and error.line == 5
    assert "'resources.cpu'" in str(error)


def test_not_yaml_is_one_line_with_line_number(tmp_path: Path) -> None:
    root = make_repo(tmp_path, {".dstack/workflows.yaml": "workflows:\n  - name: a\n    commands: [echo\n"})
    project = load_project(root)
    assert project.names() == []
    (error,) = project.validate()
    assert error.file == ".dstack/workflows.yaml" and error.line is not None
    assert "not valid YAML" in str(error) and "\n" not in str(error)
    with pytest.raises(ConfigError, match="not valid YAML"):
        project.job_spec("a")


def test_binary_file(tmp_path: Path) -> None:
    root = make_repo(tmp_path, {})
    (root / ".dstack").mkdir()
    (root / ".dstack" / "workflows.yaml").write_bytes(b"\xff\xfe\x00bin")
    (error,) = load_project(root).validate()
    assert str(error).startswith(".dstack/workflows.yaml: not a text file")


def test_unknown_workflow_suggests(tmp_path: Path) -> None:
    project = load_project(make_repo(tmp_path, {".dstack/workflows.yaml": BASIC}))
    with pytest.raises(UsageError, match="unknown workflow 'trian' — did you mean 'train'"):
        project.job_spec("trian")
    with pytest.raises(UsageError, match="workflows: prepare, train"):
        project.variables("zzz")


def test_top_level_misspelling(tmp_path: Path) -> None:
    root = make_repo(tmp_path, {".dstack/workflows.yaml": "workflow:\n  - name: a\n    commands: [echo]\n"})
    (error,) = load_project(root).validate()
    assert str(error) == ".dstack/workflows.yaml:1: unknown field 'workflow' — did you mean 'workflows'?"


def test_validate_lists_every_problem(tmp_path: Path) -> None:
    root = make_repo(
        tmp_path,
        {
            ".dstack/workflows.yaml": """\
            workflows:
              - name: a
                comands: [echo]
              - name: b
                provider: bsh
                commands: [echo]
              - name: c
                commands:
                  - echo ${{ nope }}
              - name: fine
                commands: [echo]
            """,
            ".dstack/variables.yaml": "variables:\n  trian:\n    lr: 1\n",
            ".dstack/config.yaml": "backend: local\nbuckt: x\n",
        },
    )
    problems = [str(p) for p in load_project(root).validate()]
    assert problems == [
        ".dstack/config.yaml:2: unknown field 'buckt' — did you mean 'bucket'?",
        ".dstack/variables.yaml:2: variables for unknown workflow 'trian' — "
        "remove the section or add the workflow",
        ".dstack/workflows.yaml:3: unknown field 'comands' — did you mean 'commands'?",
        ".dstack/workflows.yaml:5: unknown provider 'bsh' — did you mean 'bash'?",
        ".dstack/workflows.yaml:9: unknown variable 'nope' in 'commands' — "
        "define it in .dstack/variables.yaml"
        " (this workflow's variables: none)",
    ]


def test_settings(tmp_path: Path) -> None:
    root = make_repo(
        tmp_path,
        {
            ".dstack/workflows.yaml": BASIC,
            ".dstack/config.yaml": "backend: aws\nbucket: my-bucket\nregion: eu-west-1\n",
        },
    )
    settings = load_project(root).settings
    assert (settings.backend, settings.bucket, settings.region) == ("aws", "my-bucket", "eu-west-1")
    root2 = make_repo(tmp_path / "two", {".dstack/workflows.yaml": BASIC})
    assert load_project(root2).settings.backend is None


def test_json_schema() -> None:
    schema = json_schema()
    json.dumps(schema)
    workflow = schema["$defs"]["RawWorkflow"]
    assert {"name", "commands", "artifacts", "depends-on", "deps", "resources", "ports", "retry"} <= set(
        workflow["properties"]
    )
    assert workflow["additionalProperties"] is False
    assert "workflows" in schema["properties"]


def test_loading_is_fast(tmp_path: Path) -> None:
    items = "".join(f"  - name: w{i}\n    help: step {i}\n    commands: [echo {i}]\n" for i in range(100))
    root = make_repo(tmp_path, {".dstack/workflows.yaml": "workflows:\n" + items})
    import time

    start = time.perf_counter()
    project = load_project(root)
    names = [(n, project.help(n)) for n in project.names()]
    elapsed = time.perf_counter() - start
    assert len(names) == 100
    assert elapsed < 0.5
