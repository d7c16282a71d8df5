"""Triggers: Git hooks that start runs after commits, crontab schedules, `dstack watch`, and what fired."""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from helpers import copy_example, dstack, git, write

from dstack.errors import ConfigError
from dstack.triggers.model import check_cron, parse_triggers

WORKFLOWS = """\
workflows:
  - name: train
    commands: [cat train.py]
    triggers:
      - repo:
          include: [train.py, "src/**"]
"""


def wait_for(what: str, check: Callable[[], Any], timeout: float = 30) -> Any:
    """Poll `check` until it returns something truthy; fail the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.2)
    pytest.fail(f"timed out after {timeout}s waiting for {what}")


def runs(repo: Path) -> list[dict[str, Any]]:
    return json.loads(dstack("runs", "--json", cwd=repo).out)


def hook_log(home: Path) -> str:
    path = home / "triggers" / "hooks.log"
    return path.read_text() if path.exists() else ""


def hook_files(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Every file of a hooks folder with its bytes and full mode (symlinks as their target)."""
    found = {}
    for p in sorted(folder.iterdir()) if folder.exists() else []:
        st = os.lstat(p)
        data = os.readlink(p).encode() if p.is_symlink() else p.read_bytes()
        found[p.name] = (data, st.st_mode)
    return found


def test_commit_to_an_included_file_starts_a_run_other_files_none(make_repo, dstack_home):
    repo = make_repo({".dstack/workflows.yaml": WORKFLOWS, "train.py": "v1\n", "README": "hi\n"})
    before = hook_files(repo / ".git/hooks")
    dstack("run", "train", cwd=repo)
    assert hook_files(repo / ".git/hooks") == before, "nothing is installed without `dstack triggers install`"

    res = dstack("triggers", "install", cwd=repo)
    assert "hook post-commit: installed" in res.out and "hook post-merge: installed" in res.out
    write(repo, "README", "changed\n")
    git(repo, "commit", "-qam", "docs only")
    wait_for("the hook's log line", lambda: "no trigger matched" in hook_log(dstack_home))
    assert len(runs(repo)) == 1

    write(repo, "train.py", "v2\n")
    write(repo, "uncommitted.txt", "not in the commit\n")
    started = time.monotonic()
    git(repo, "add", "train.py")
    git(repo, "commit", "-qm", "new model")
    took = time.monotonic() - started
    assert took < 2, f"the hook must not slow a commit (git add + commit took {took:.2f}s)"
    sha = git(repo, "rev-parse", "HEAD").strip()
    run = wait_for("a run started by the commit", lambda: [r for r in runs(repo) if r["origin"] != "manual"])[
        0
    ]
    assert run["origin"] == f"commit {sha}" and run["commit"] == sha
    assert f"post-commit {sha[:12]}: train: run {run['name']} started" in hook_log(dstack_home)
    wait_for("the run to end", lambda: runs(repo)[0]["status"] in ("done", "failed"))
    assert dstack("logs", run["name"], cwd=repo).out == "v2\n"
    table = dstack("runs", cwd=repo).out
    assert "Started by" in table and f"commit {sha[:8]}" in table and "manual" in table
    assert f"started by: commit {sha[:8]}" in dstack("lineage", run["name"], cwd=repo).out

    listed = json.loads(dstack("triggers", "--json", cwd=repo).out)
    [trigger] = listed["triggers"]
    assert trigger["installed"] is True and trigger["last_run"] == run["name"]
    assert trigger["trigger"] == "commit train.py, src/**" and trigger["last_origin"] == f"commit {sha}"
    dstack("triggers", "uninstall", cwd=repo)
    assert hook_files(repo / ".git/hooks") == before


def test_existing_hooks_still_run_and_uninstall_gives_them_back_byte_for_byte(make_repo, tmp_path):
    repo = make_repo({".dstack/workflows.yaml": WORKFLOWS, "train.py": "v1\n"})
    hooks = repo / ".git/hooks"
    seen = tmp_path / "seen"
    write(repo, ".git/hooks/post-commit", f'#!/bin/sh\necho "post-commit $# $*" >> {seen}\n')
    (hooks / "post-commit").chmod(0o750)
    write(repo, ".git/hooks/real-post-merge", f'#!/bin/sh\necho "post-merge $1" >> {seen}\nexit 3\n')
    (hooks / "real-post-merge").chmod(0o700)
    (hooks / "post-merge").symlink_to("real-post-merge")
    before = hook_files(hooks)

    dstack("triggers", "install", cwd=repo)
    dstack("triggers", "install", cwd=repo)  # twice: still one chain, the saved hooks untouched
    assert "(runs the hook that was there first)" in dstack("triggers", cwd=repo).out
    write(repo, "other.txt", "x\n")
    git(repo, "add", "other.txt")
    git(repo, "commit", "-qm", "one")
    git(repo, "checkout", "-q", "-b", "side")
    write(repo, "side.txt", "x\n")
    git(repo, "add", "side.txt")
    git(repo, "commit", "-qm", "side")
    git(repo, "checkout", "-q", "main")
    git(repo, "merge", "-q", "--ff-only", "side")  # post-merge's exit status never fails a merge
    assert seen.read_text() == "post-commit 0 \npost-commit 0 \npost-merge 0\n"

    dstack("triggers", "uninstall", cwd=repo)
    assert hook_files(hooks) == before
    assert not any(p.name.endswith(".dstack-saved") for p in hooks.iterdir())


def test_commits_a_rebase_makes_start_no_runs(make_repo, dstack_home):
    repo = make_repo({".dstack/workflows.yaml": WORKFLOWS, "train.py": "v1\n"})
    dstack("triggers", "install", cwd=repo)
    git(repo, "checkout", "-q", "-b", "side")
    write(repo, "train.py", "v2\n")
    git(repo, "commit", "-qam", "side")
    git(repo, "checkout", "-q", "main")
    write(repo, "other.txt", "x\n")
    git(repo, "add", "other.txt")
    git(repo, "commit", "-qm", "main")
    git(repo, "checkout", "-q", "side")
    git(repo, "rebase", "-q", "main")
    log = wait_for("three log lines", lambda: (t := hook_log(dstack_home)).count("\n") == 3 and t)
    assert log.count("made by a rebase: no runs started") == 1  # lines come in the order hooks finish
    assert len(runs(repo)) == 1


def test_core_hooks_path_is_honoured_and_a_folder_dstack_made_is_removed(make_repo):
    repo = make_repo({".dstack/workflows.yaml": WORKFLOWS, "train.py": "v1\n"})
    git(repo, "config", "core.hooksPath", "githooks")
    dstack("triggers", "install", cwd=repo)
    assert (repo / "githooks/post-commit").is_file()
    assert stat.S_IMODE((repo / "githooks/post-commit").stat().st_mode) == 0o755
    dstack("triggers", "uninstall", cwd=repo)
    assert not (repo / "githooks").exists()


def test_one_project_per_hooks_folder_and_uninstall_without_dstack_folder(make_repo):
    repo = make_repo({".dstack/workflows.yaml": WORKFLOWS, "sub/.dstack/workflows.yaml": WORKFLOWS})
    before = hook_files(repo / ".git/hooks")
    dstack("triggers", "install", cwd=repo)
    res = dstack("triggers", "install", cwd=repo / "sub", check=False)
    assert res.code == 2 and f"already starts runs for the project in {repo.resolve()}" in res.err
    shutil.rmtree(repo / ".dstack")
    shutil.rmtree(repo / "sub")
    dstack("triggers", "uninstall", cwd=repo)
    assert hook_files(repo / ".git/hooks") == before


def test_a_broken_dstack_folder_makes_the_hook_log_one_line_and_the_commit_succeed(make_repo, dstack_home):
    repo = make_repo({".dstack/workflows.yaml": WORKFLOWS, "train.py": "v1\n"})
    dstack("triggers", "install", cwd=repo)
    write(repo, ".dstack/workflows.yaml", "workflows:\n  - name: train\n    commands: [oops\n")
    write(repo, "train.py", "v2\n")
    git(repo, "commit", "-qam", "broken")
    line = wait_for("the hook's log line", lambda: hook_log(dstack_home))
    assert line.count("\n") == 1 and "no runs started: .dstack/workflows.yaml:" in line
    assert runs(repo) == []


def test_schedule_entries_in_a_crontab_file(make_repo, tmp_path):
    """DSTACK_CRONTAB points dstack at a file instead of the user's crontab (so this test never touches it)."""
    crontab = tmp_path / "crontab"
    crontab.write_text("MAILTO=me\n17 * * * * echo mine\n")
    original = crontab.read_bytes()
    repo = make_repo(
        {
            ".dstack/workflows.yaml": "workflows:\n  - name: nightly\n    commands: [echo hi]\n"
            '    triggers:\n      - schedule: "0 3 * * *"\n'
        }
    )
    env = {"DSTACK_CRONTAB": str(crontab)}
    dstack("triggers", "install", cwd=repo, env=env)
    dstack("triggers", "install", cwd=repo, env=env)
    text = crontab.read_text()
    assert text.startswith(original.decode()) and text.count("# dstack trigger ") == 1
    entry = text.splitlines()[-1]
    assert entry.startswith(f"0 3 * * * cd {repo.resolve()} && ")
    assert entry.endswith("triggers scheduled nightly --schedule '0 3 * * *' >>" + entry.rsplit(">>", 1)[1])
    assert not (repo / ".git/hooks/post-commit").exists(), "a schedule alone needs no hooks"
    listed = json.loads(dstack("triggers", "--json", cwd=repo, env=env).out)
    assert listed["triggers"][0]["installed"] is True and listed["schedules"][0]["line"] == entry
    dstack("triggers", "uninstall", cwd=repo, env=env)
    assert crontab.read_bytes() == original


@pytest.mark.skipif(shutil.which("crontab") is None, reason="no `crontab` here (scripts/test installs cron)")
def test_schedule_entries_in_the_real_crontab(make_repo):
    repo = make_repo(
        {
            ".dstack/workflows.yaml": "workflows:\n  - name: nightly\n    commands: [echo hi]\n"
            '    triggers:\n      - schedule: "30 4 * * 1-5"\n'
        }
    )
    before = subprocess.run(["crontab", "-l"], capture_output=True, text=True, timeout=10)
    try:
        dstack("triggers", "install", cwd=repo)
        now = subprocess.run(["crontab", "-l"], capture_output=True, text=True, timeout=10).stdout
        assert f"30 4 * * 1-5 cd {repo.resolve()} && " in now
        assert "schedules: crontab" in dstack("triggers", cwd=repo).out
        dstack("triggers", "uninstall", cwd=repo)
        after = subprocess.run(["crontab", "-l"], capture_output=True, text=True, timeout=10)
        assert (after.returncode, after.stdout) == (before.returncode, before.stdout)
    finally:
        if before.returncode == 0:
            subprocess.run(["crontab", "-"], input=before.stdout, text=True, timeout=10)
        else:
            subprocess.run(["crontab", "-r"], capture_output=True, timeout=10)


def test_a_scheduled_run_uses_the_committed_head_and_is_skipped_when_nothing_changed(make_repo, tmp_path):
    repo = make_repo(
        {
            ".dstack/workflows.yaml": "workflows:\n  - name: nightly\n    commands: [cat data.txt]\n"
            '    triggers:\n      - schedule: "@daily"\n',
            "data.txt": "committed\n",
        }
    )
    write(repo, "data.txt", "uncommitted\n")
    write(repo, ".dstack/workflows.yaml", "workflows:\n  - name: nightly\n    commands: [echo not this]\n")
    first = dstack("triggers", "scheduled", "nightly", "--schedule", "@daily", cwd=repo).out
    assert "schedule @daily nightly: run " in first and first.rstrip().endswith("started")
    run = runs(repo)[0]
    assert run["origin"] == "schedule @daily" and run["commit"] == git(repo, "rev-parse", "HEAD").strip()
    wait_for("the run to end", lambda: runs(repo)[0]["status"] in ("done", "failed"))
    assert dstack("logs", run["name"], cwd=repo).out == "committed\n"
    second = dstack("triggers", "scheduled", "nightly", "--schedule", "@daily", cwd=repo).out
    assert "skipped: nothing changed, every job would be reused" in second
    assert len(runs(repo)) == 1


@pytest.mark.parametrize(
    "trigger, message",
    [
        ('{schedule: "0 3 * *"}', "schedule '0 3 * *' has 4 field(s); cron needs 5"),
        ('{schedule: "61 * * * *"}', "schedule '61 * * * *': minute '61' is out of range (0-59)"),
        ("{repo: {include: 3}}", "'include' must be a list of globs"),
    ],
)
def test_bad_triggers_are_errors_with_file_and_line(make_repo, trigger, message):
    repo = make_repo(
        {
            ".dstack/workflows.yaml": f"workflows:\n  - name: w\n    commands: [echo]\n    triggers:\n      - {trigger}\n"
        }
    )
    res = dstack("triggers", "install", cwd=repo, check=False)
    assert res.code == 2 and f"Error: .dstack/workflows.yaml:5: {message}" in res.err
    assert message in dstack("validate", cwd=repo, check=False).err
    assert not (repo / ".git/hooks/post-commit").exists()


def test_kinds_dstack_does_not_run_are_kept_with_a_notice_and_refused_by_install(make_repo):
    repo = make_repo(
        {
            ".dstack/workflows.yaml": "workflows:\n  - name: w\n    commands: [echo]\n    triggers:\n      - {nightly: 1}\n"
        }
    )
    res = dstack("run", "w", cwd=repo)
    assert (
        ".dstack/workflows.yaml:5: unknown trigger 'nightly' — dstack runs `repo:` and `schedule:` triggers"
        in res.err
    )
    assert "it is kept but never run" in res.err
    res = dstack("triggers", "install", cwd=repo, check=False)
    assert res.code == 2 and "Error: .dstack/workflows.yaml:2: unknown trigger 'nightly'" in res.err


def test_trigger_forms() -> None:
    assert [t.describe() for t in parse_triggers("w", ["push", "commit"], "f", 1)] == [
        "commit (any file)"
    ] * 2
    [t] = parse_triggers("w", [{"repo": {"include": ["a.py"]}}], "f", 1)
    assert (t.kind, t.include) == ("repo", ("a.py",))
    assert check_cron("*/15  0-6,22 * jan-mar mon-fri") == "*/15 0-6,22 * jan-mar mon-fri"
    with pytest.raises(ConfigError, match="f:4: schedule '5-1 \\* \\* \\* \\*': minute '5-1' is a range"):
        check_cron("5-1 * * * *", "f", 4)


def test_watch_reruns_on_each_change_and_stops_the_previous_run(make_repo, tmp_path):
    repo = make_repo(
        {
            ".dstack/workflows.yaml": "workflows:\n  - name: train\n    commands: [cat train.py, sleep 30]\n"
            "    triggers: [{repo: {include: [train.py]}}]\n",
            "train.py": "v1\n",
        }
    )
    err = tmp_path / "watch.err"
    with open(err, "w") as f:
        proc = subprocess.Popen(
            [sys.executable, "-m", "dstack", "watch", "train"], cwd=repo, stdout=f, stderr=f, text=True
        )
    names: list[str] = []
    try:
        wait_for("the watcher to start", lambda: "Watching" in err.read_text(), timeout=20)
        write(repo, "README", "not watched\n")
        write(repo, "train.py", "v2\n")
        first = wait_for("a first run", lambda: runs(repo), timeout=20)
        names.append(first[0]["name"])
        write(repo, "train.py", "v3\n")
        both = wait_for("a second run", lambda: (r := runs(repo)) and len(r) == 2 and r, timeout=20)
        write(repo, "train.py", "v3\n")  # same bytes, new mtime: no change
        time.sleep(1.5)
        names.append(both[0]["name"])
        assert [r["origin"] for r in both] == ["watch", "watch"]
        assert both[1]["status"] in ("stopped", "done"), both[1]
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=15)
        for name in names:
            dstack("stop", name, cwd=repo, check=False)
    out = err.read_text()
    assert f"stopped run {names[0]} (files changed)" in out and "Stopped watching" in out
    assert len(runs(repo)) == 2
    assert proc.returncode == 130
    assert wait_for("the first run's output", lambda: dstack("logs", names[0], cwd=repo).out) == "v2\n"


def test_a_commit_retrains_the_example(tmp_path, dstack_home):
    repo = copy_example("digits", tmp_path / "digits")
    dstack("triggers", "install", cwd=repo)
    text = (repo / "train.py").read_text()
    write(repo, "train.py", text + "\n# a new comment\n")
    git(repo, "commit", "-qam", "retrain")
    sha = git(repo, "rev-parse", "HEAD").strip()
    run = wait_for("the triggered run", lambda: runs(repo), timeout=30)[0]
    assert (run["workflow"], run["origin"]) == ("train", f"commit {sha}")
    done = wait_for("train to finish", lambda: runs(repo)[0]["status"] in ("done", "failed") and runs(repo))
    assert done[0]["status"] == "done", dstack("logs", run["name"], cwd=repo, check=False).output
    dstack("triggers", "uninstall", cwd=repo)


@pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="no systemd-analyze to check OnCalendar with"
)
def test_schedules_as_systemd_calendar_expressions() -> None:
    """Machines without cron get systemd user timers; systemd itself checks each converted expression."""
    from dstack.triggers.timers import TimerError, on_calendar, unit_files

    cases = {
        "0 3 * * *": "*-*-* 03:00:00",
        "*/15 * * * *": "*-*-* *:00,15,30,45:00",
        "30 4 * * mon-fri": "Mon,Tue,Wed,Thu,Fri *-*-* 04:30:00",
        "0 12 1,15 jan *": "*-01-01,15 12:00:00",
        "@weekly": "Sun *-*-* 00:00:00",
    }
    for cron, calendar in cases.items():
        assert on_calendar(check_cron(cron)) == calendar
        proc = subprocess.run(["systemd-analyze", "calendar", calendar], capture_output=True, timeout=10)
        assert proc.returncode == 0, proc.stderr
    with pytest.raises(TimerError, match="day of the month OR a weekday"):
        on_calendar("0 0 1 * mon")
    files = unit_files("/a b/%p", "w $x", "0 3 * * *", Path("/l"), {"PATH": "/bin:$HOME"})
    service = next(text for name, text in files.items() if name.endswith(".service"))
    assert "WorkingDirectory=/a b/%%p\n" in service and 'Environment="PATH=/bin:$HOME"' in service
    assert ' "scheduled" "w $$x" "--schedule" "0 3 * * *"' in service
