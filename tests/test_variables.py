"""Variables: defaults, overrides, substitution, and values that never reach a shell unquoted."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from helpers import git_repo_with as make_repo

from dstack.errors import ConfigError, UsageError
from dstack.specs import JobSpec
from dstack.workflows import load_project
from dstack.workflows.variables import (
    Substituter,
    config_args,
    expand_env,
    quote_env_value,
    shell_definitions,
)


def run_spec(root: Path, spec: JobSpec) -> str:
    """Run a spec's commands the way the runner does (bash, `set -e`, env, working dir); return stdout."""
    env = {
        **os.environ,
        **spec.env,
        "RUN_NAME": "run-1",
        "JOB_ID": "job-1",
        "run_name": "run-1",
        "job_id": "job-1",
    }
    script = "set -e\n" + "\n".join(spec.commands)
    done = subprocess.run(
        ["bash", "-c", script],
        cwd=root / spec.working_dir,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


WORKFLOWS = """\
workflows:
  - name: train
    working_dir: src
    commands:
      - echo "model=$model LR=$LR"
      - echo ${{ model }}
      - printf '%s|' $config_args
      - echo
      - printf '%s|' ${{ variables_as_args }} ${{ run.args }}
      - echo
      - echo ${{ run_name }} ${{ job_id }} $config_args_extra.
    artifacts:
      - out/${{ model }}/${{ run_name }}
"""
VARIABLES = """\
variables:
  global:
    model: small
    lr: 0.010
  train:
    model: resnet
    epochs: 3
"""


@pytest.fixture
def project_root(tmp_path: Path) -> Path:
    return make_repo(
        tmp_path, {".dstack/workflows.yaml": WORKFLOWS, ".dstack/variables.yaml": VARIABLES, "src/.keep": ""}
    )


def test_defaults_global_then_workflow(project_root: Path) -> None:
    assert load_project(project_root).variables("train") == {"model": "resnet", "lr": "0.010", "epochs": "3"}


def test_substitution_and_env(project_root: Path) -> None:
    spec = load_project(project_root).job_spec("train", {"lr": "0.5"}, ["--seed", "1 2"])
    assert spec.variables == {"model": "resnet", "lr": "0.5", "epochs": "3"}
    assert spec.env["lr"] == spec.env["LR"] == "0.5"
    assert spec.env["MODEL"] == "resnet"
    assert spec.artifacts[0].path == "out/resnet/${{ run_name }}"  # the lead substitutes run_name
    assert spec.working_dir == "src"
    out = run_spec(project_root, spec).splitlines()
    assert out == [
        "model=resnet LR=0.5",
        "resnet",
        "--model|resnet|--lr|0.5|--epochs|3|",
        "--model|resnet|--lr|0.5|--epochs|3|--seed|1 2|",
        "run-1 job-1 .",
    ]


@pytest.mark.parametrize(
    "value",
    [
        "'; touch pwned; '",
        "$(touch pwned)",
        "`touch pwned`",
        "a b; touch pwned",
        '"; touch pwned #',
        "x\ntouch pwned",
    ],
)
def test_hostile_values_stay_data(project_root: Path, value: str) -> None:
    spec = load_project(project_root).job_spec("train", {"model": value}, [value])
    out = run_spec(project_root, spec)
    assert not (project_root / "src" / "pwned").exists()
    assert value in out


def test_unknown_override_names_known_ones(project_root: Path) -> None:
    with pytest.raises(
        UsageError, match=r"unknown variable 'lrr' for workflow 'train' — its variables: model, lr, epochs"
    ):
        load_project(project_root).job_spec("train", {"lrr": "1"})


def test_unknown_variable_in_field(tmp_path: Path) -> None:
    root = make_repo(
        tmp_path,
        {
            ".dstack/workflows.yaml": """\
        workflows:
          - name: w
            commands:
              - echo hi
            artifacts:
              - ${{ output_dir }}
        """
        },
    )
    with pytest.raises(ConfigError) as e:
        load_project(root).job_spec("w")
    assert str(e.value) == (
        ".dstack/workflows.yaml:6: unknown variable 'output_dir' in 'artifacts' — "
        "define it in .dstack/variables.yaml (this workflow's variables: none)"
    )


def test_variable_names_may_have_hyphens_but_nothing_else(tmp_path: Path) -> None:
    root = make_repo(
        tmp_path,
        {
            ".dstack/workflows.yaml": "workflows:\n  - name: w\n    commands: [echo]\n"
            "  - name: v\n    commands: [echo]\n  - name: u\n    commands: [echo]\n",
            ".dstack/variables.yaml": "variables:\n  w:\n    learning-rate: 1\n  v:\n    lr!: 1\n"
            "  u:\n    batch-size: 1\n    batch_size: 2\n",
        },
    )
    project = load_project(root)
    assert project.error("w") is None and project.variables("w") == {"learning-rate": "1"}
    assert str(project.error("v")).startswith(".dstack/variables.yaml:5: variable name 'lr!' is not a name")
    assert str(project.error("u")).startswith(
        ".dstack/variables.yaml:8: variables 'batch-size' and 'batch_size' are the same variable $batch_size"
    )


def test_configs_yaml_older_form(tmp_path: Path) -> None:
    root = make_repo(
        tmp_path,
        {
            ".dstack/workflows.yaml": "workflows:\n  - name: w\n    commands:\n      - echo $config_args\n",
            ".dstack/configs.yaml": "configs:\n  global:\n    seed: 7\n  w:\n    batch: 32\n",
        },
    )
    project = load_project(root)
    assert project.variables("w") == {"seed": "7", "batch": "32"}
    assert run_spec(root, project.job_spec("w")).strip() == "--seed 7 --batch 32"


def test_substituter_modes() -> None:
    s = Substituter({"a": "x y"}, ["p q"], file="f")
    assert s.shell("echo ${{a}} ${{ run.args }}", "commands", 1) == "echo \"${DSTACK_VAR_a}\" 'p q'"
    assert s.plain("dir/${{ a }}/${{ job_id }}", "artifacts", 1) == "dir/x y/${{ job_id }}"
    assert (
        s.shell("$config_args $config_argsX ${config_args}", "commands", 1)
        == '--a "${DSTACK_VAR_a}" $config_argsX --a "${DSTACK_VAR_a}"'
    )
    assert config_args({"n": "it's"}) == "--n 'it'\"'\"'s'"
    assert shell_definitions(['echo "${DSTACK_VAR_a}"'], {"a": "it's"}) == ["DSTACK_VAR_a='it'\"'\"'s'"]


HOSTILE = "$(touch {p}) `touch {p}` ' \" \\ $HOME ${{x}} ; touch {p} #"


@pytest.mark.parametrize(
    "command, expected",
    [
        ('echo "x=${{ x }}"', "x={v}"),
        ("echo 'y=${{ x }}'", "y={v}"),
        ("echo z=${{ x }}", "z={v}"),
        ("echo $'a=${{ x }}'", "a={v}"),
        ('echo "$(echo \'${{ x }}\')" `echo "${{ x }}"`', "{v} {v}"),
        ("printf '%s|' ${{ variables_as_args }} \"$config_args\"", "--x|{v}|--x {v}|"),
        ("cat <<EOF\nh=${{ x }} \"q\" 'r'\nEOF", "h={v} \"q\" 'r'"),
        ("echo ${unset:-${{ x }}} # it's ${{ x }}", "{v}"),
    ],
)
def test_values_stay_data_in_every_quoting_context(tmp_path: Path, command: str, expected: str) -> None:
    """`--x '$(touch /tmp/p)'` (issue 13, item 5): whatever quotes surround `${{ x }}`, the value is printed."""
    mark = tmp_path / "p"
    value = HOSTILE.format(p=mark)
    s = Substituter({"x": value}, [], file="f")
    line = s.shell(command, "commands", 1)
    script = "\n".join(["set -e", *shell_definitions([line], s.variables), line])
    done = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=10, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.rstrip("\n") == expected.format(v=value)
    assert not mark.exists()


def test_a_quoted_here_document_refuses_variables() -> None:
    s = Substituter({"x": "1"}, [], file="f")
    with pytest.raises(ConfigError, match="quoted here-document"):
        s.shell("cat <<'EOF'\n${{ x }}\nEOF", "commands", 3)


def test_variable_named_path_does_not_replace_path(tmp_path: Path) -> None:
    root = make_repo(
        tmp_path,
        {
            ".dstack/workflows.yaml": "workflows:\n  - name: w\n    commands:\n      - ls -d $path\n",
            ".dstack/variables.yaml": "variables:\n  w:\n    path: /\n",
        },
    )
    spec = load_project(root).job_spec("w")
    assert spec.env == {"path": "/"}
    assert spec.notices == ["variable 'path' is not exported as PATH (that would replace the job's own)"]
    assert run_spec(root, spec) == "/\n"


def test_expand_env_without_running_anything() -> None:
    env = expand_env(
        {"P": "$HOME/bin:${PATH}", "Q": "$(rm -rf /)", "R": "$P/x"}, {"HOME": "/h", "PATH": "/usr"}
    )
    assert env == {"P": "/h/bin:/usr", "Q": "$(rm -rf /)", "R": "/h/bin:/usr/x"}


def test_quote_env_value_expands_only_references(tmp_path: Path) -> None:
    env = {
        "A": "$HOME/bin:${PATH}",
        "B": "$(touch pwned) `touch pwned` \\ \" ' $ $1 ${x:-y} !",
        "C": "multi\nline",
    }
    script = "".join(f"export {k}={quote_env_value(v)}\n" for k, v in env.items())
    script += 'printf "%s|" "$A" "$B" "$C"'
    done = subprocess.run(
        ["bash", "-c", script],
        cwd=tmp_path,
        env={"HOME": "/h", "PATH": os.environ["PATH"]},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"/h/bin:{os.environ['PATH']}|{env['B']}|multi\nline|"
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("provider", ["torchrun", "fastapi", "lab", "python"])
def test_every_provider_defines_the_variables_its_commands_refer_to(tmp_path: Path, provider: str) -> None:
    root = make_repo(
        tmp_path,
        {
            ".dstack/workflows.yaml": f"""\
workflows:
  - name: w
    provider: {provider}
    script: train.py
    app: main:app
    args: --lr ${{{{ lr }}}}
    commands: ["echo 'lr=${{{{ lr }}}}'"]
""",
            ".dstack/variables.yaml": 'variables:\n  w:\n    lr: "$(touch pwned)"\n',
        },
    )
    spec = load_project(root).job_spec("w")
    assert spec.commands[0] == "DSTACK_VAR_lr='$(touch pwned)'"
    assert spec.commands[1] == "echo 'lr='\"${DSTACK_VAR_lr}\"''"
    assert provider == "lab" or '--lr "${DSTACK_VAR_lr}"' in spec.commands[-1]
