"""Starting runs when triggers fire: after a commit (from a hook), on a schedule (from cron), and on a file
change (`dstack watch`); each fire is recorded with what came of it."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from dstack.errors import DstackError
from dstack.repo import find_repo_root, is_included
from dstack.store.state import State
from dstack.store.triggers import Fire, record_fire
from dstack.triggers.model import Trigger, parse_triggers

if TYPE_CHECKING:
    from dstack.workflows.project import Project


def project_triggers(project: Project) -> list[Trigger]:
    """Every trigger of the project's workflows; the first ConfigError (file:line) if one is broken."""
    errors = project.load_errors()
    if errors:
        raise errors[0]
    found: list[Trigger] = []
    for name in project.names():
        if project.triggers(name) is None:
            continue
        wf = project.workflow(name)
        for t in parse_triggers(name, wf.triggers, wf.file, wf.line):
            if t.kind == "repo" and t.include is None and wf.repo_include:
                t = replace(t, include=tuple(wf.repo_include))  # `push`: the files the workflow reads
            found.append(t)
    return found


def start(
    state: State,
    project_root: Path,
    trigger: Trigger,
    origin: str,
    from_commit: str | None = None,
    skip_if_reused: bool = False,
) -> Fire:
    """Create the workflow's run (detached, like `dstack run W -d`) and record the fire."""
    from dstack.runs import RunRequest, create_run
    from dstack.scheduler.daemon import start_orchestrator

    kind = "watch" if origin == "watch" else trigger.kind
    fire = Fire(str(project_root), trigger.workflow, kind, origin, outcome="started")
    try:
        request = RunRequest(
            trigger.workflow,
            project_root,
            origin=origin,
            from_commit=from_commit,
            skip_if_reused=skip_if_reused,
        )
        created = create_run(state, request)
    except DstackError as e:
        fire.outcome = f"failed: {e}"
        record_fire(state, fire)
        return fire
    if not created.recorded:
        fire.outcome = "skipped: nothing changed, every job would be reused"
    else:
        fire.run_id, fire.run_name = created.run.id, created.run.name
        if created.run.status == "done":
            fire.outcome = "done: every job reused"
        else:
            start_orchestrator(created.run.id)
    record_fire(state, fire)
    return fire


def on_commit(
    state: State, project_root: Path, commit: str, before: str | None = None
) -> Iterator[tuple[Trigger, Fire | None, list[str]]]:
    """After a commit: for each repo trigger, the fire it caused (None: no changed file matched)."""
    from dstack.triggers.hooks import changed_paths
    from dstack.workflows import load_project

    project = load_project(project_root)
    triggers = [t for t in project_triggers(project) if t.kind == "repo"]
    repo_root = find_repo_root(project_root)
    subdir = project_root.resolve().relative_to(repo_root.resolve()).as_posix()
    prefix = "" if subdir in ("", ".") else subdir + "/"
    paths = [p[len(prefix) :] for p in changed_paths(repo_root, commit, before) if p.startswith(prefix)]
    fired: set[str] = set()
    for trigger in triggers:
        matched = [p for p in paths if trigger.include is None or is_included(p, list(trigger.include))]
        if not matched or trigger.workflow in fired:
            yield trigger, None, matched
            continue
        fired.add(trigger.workflow)
        yield trigger, start(state, project_root, trigger, f"commit {commit}", from_commit=commit), matched


def on_schedule(state: State, project_root: Path, workflow: str, schedule: str) -> Fire:
    """A scheduled run of the committed HEAD; skipped when every job would only be reused."""
    trigger = Trigger(workflow, "schedule", schedule=schedule)
    return start(
        state, project_root, trigger, f"schedule {schedule}", from_commit="HEAD", skip_if_reused=True
    )
