"""examples/digits: its scripts work on their own, and the pipeline runs through `dstack run evaluate`."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import EXAMPLES, DstackCliRunner, copy_example, dstack

DIGITS = EXAMPLES / "digits"


def run_script(cwd: Path, *args: str) -> str:
    """Run one of the example's scripts with this interpreter in `cwd`; returns its stdout."""
    proc = subprocess.run(
        [sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL
    )
    assert proc.returncode == 0, f"{args} exited with {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


@pytest.fixture
def digits(tmp_path: Path) -> Path:
    """A copy of examples/digits made into a committed Git repo."""
    return copy_example("digits", tmp_path / "digits")


def test_scripts_run_in_order_and_write_their_outputs(digits: Path) -> None:
    out = run_script(digits, "prepare.py")
    assert "train: 1347 images, test: 450 images" in out
    assert (digits / "data" / "train.npz").is_file() and (digits / "data" / "test.npz").is_file()

    out = run_script(digits, "train.py", "--lr", "0.01", "--max-iter", "10")
    assert "epoch 1/10 loss=" in out and "epoch 10/10 loss=" in out
    metrics = json.loads((digits / "model" / "metrics.json").read_text())
    assert metrics["lr"] == 0.01 and metrics["epochs"] == 10
    assert (digits / "model" / "model.pkl").is_file()

    out = run_script(digits, "evaluate.py")
    report = json.loads((digits / "eval" / "report.json").read_text())
    assert f"accuracy: {report['accuracy']:.4f}" in out
    assert report["accuracy"] > 0.9
    assert report["test_images"] == 450
    assert len(report["confusion_matrix"]) == 10


def test_train_accepts_the_variable_spellings_config_args_produce(digits: Path) -> None:
    run_script(digits, "prepare.py")
    out = run_script(digits, "train.py", "--lr", "0.05", "--max_iter", "2")
    assert "epoch 2/2" in out
    assert json.loads((digits / "model" / "metrics.json").read_text())["lr"] == 0.05


def test_train_rejects_a_bad_learning_rate(digits: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "train.py", "--lr", "0"], cwd=digits, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2
    assert "--lr must be > 0" in proc.stderr


def test_workflows_form_a_prepare_train_evaluate_chain() -> None:
    config = yaml.safe_load((DIGITS / ".dstack" / "workflows.yaml").read_text())
    workflows = {w["name"]: w for w in config["workflows"]}
    assert list(workflows) == ["prepare", "train", "evaluate"]
    assert workflows["prepare"]["artifacts"] == ["data"]
    assert workflows["train"]["depends-on"] == ["prepare"]
    assert workflows["train"]["artifacts"] == ["model"]
    assert "train" in workflows["evaluate"]["depends-on"]
    assert workflows["evaluate"]["artifacts"] == ["eval"]
    variables = yaml.safe_load((DIGITS / ".dstack" / "variables.yaml").read_text())["variables"]
    assert set(variables["train"]) == {"lr", "max_iter"}
    for name in variables["train"]:
        assert f"${{{{ {name} }}}}" in workflows["train"]["commands"][0]


cli_missing = importlib.util.find_spec("dstack.cli.main") is None and not os.environ.get("CI")


@pytest.mark.skipif(cli_missing, reason="dstack.cli.main is not written yet")
def test_pipeline_runs_through_the_cli(digits: Path, tmp_path: Path) -> None:
    result = dstack("run", "evaluate", cwd=digits, timeout=180)
    assert "accuracy" in result.output

    runs = json.loads(dstack("runs", "--json", cwd=digits).out)
    assert isinstance(runs, list) and runs
    assert all({"name", "status"} <= set(run) for run in runs)
    run = next((r for r in runs if r.get("workflow") == "evaluate"), runs[0])
    run_name = run["name"]
    assert str(run["status"]).lower() in ("done", "succeeded", "success", "finished", "completed"), run

    listing = dstack("artifacts", "list", run_name, cwd=digits).output
    assert "eval" in listing

    target = tmp_path / "downloaded"
    dstack("artifacts", "download", run_name, "-o", str(target), cwd=digits)
    reports = list(target.rglob("report.json"))
    assert reports, f"no report.json under {target}: {sorted(p.name for p in target.rglob('*'))}"
    assert json.loads(reports[0].read_text())["accuracy"] > 0.9

    dstack("tags", "add", "digits-model", run_name, cwd=digits)
    tags = json.loads(dstack("tags", "list", "--json", cwd=digits).out)
    assert any(tag.get("name") == "digits-model" for tag in tags), tags


@pytest.mark.skipif(cli_missing, reason="dstack.cli.main is not written yet")
def test_run_help_lists_the_example_workflows(digits: Path, cli_runner: DstackCliRunner) -> None:
    out = cli_runner.run("run", "--help", cwd=digits).out
    for name in ("prepare", "train", "evaluate"):
        assert name in out
