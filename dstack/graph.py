"""Resolving a workflow's dependency graph, and the keys that decide when a job can be reused."""

from __future__ import annotations

import json
import posixpath
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from dstack.errors import ConfigError, UsageError

if TYPE_CHECKING:
    from dstack.specs import DependencySpec, JobSpec
    from dstack.store.objects import Manifest, ObjectStore
    from dstack.store.state import Job, State
    from dstack.workflows import Project


@dataclass
class TagInput:
    """Artifacts of an earlier run, reached through a tag (`prepare:latest`, `:data`)."""

    label: str
    jobs: list[Job]


@dataclass
class Node:
    """One job to create: its spec, the workflows of this run it needs, and the tagged inputs."""

    workflow: str
    spec: JobSpec
    upstream: list[str] = field(default_factory=list)
    tag_inputs: list[TagInput] = field(default_factory=list)
    key: str = ""
    upstream_keys: list[str] = field(default_factory=list)


def resolve_graph(
    project: Project, target: str, overrides: dict[str, str], args: list[str], state: State
) -> list[Node]:
    """The jobs `dstack run TARGET` needs, upstream first; a cycle, unknown workflow or tag is an error."""
    from dstack.workflows.variables import find_variable

    known_vars: set[str] = set()
    nodes: dict[str, Node] = {}
    order: list[Node] = []
    names = set(project.names())

    def make(name: str) -> Node:
        variables = project.variables(name)
        known_vars.update(variables)
        own = {k: v for k, v in overrides.items() if find_variable(variables, k) is not None}
        return Node(name, project.job_spec(name, own, args if name == target else []))

    if target not in names:
        broken = project.load_errors()
        if broken:  # the workflow may be in a file that failed to read: that file's error says why
            raise broken[0]
        raise UsageError(
            f"no workflow named '{target}' in {project.root}/.dstack",
            hint=_near(target, names) or "see `dstack run --help` for the workflows",
        )
    # Depth-first with an explicit stack (a chain of thousands of workflows is fine): [node, next dep].
    stack: list[tuple[Node, int]] = [(make(target), 0)]
    on_path = {target}
    while stack:
        node, i = stack[-1]
        deps = node.spec.depends_on
        if i == len(deps):
            stack.pop()
            on_path.discard(node.workflow)
            nodes[node.workflow] = node
            order.append(node)
            continue
        stack[-1] = (node, i + 1)
        dep = deps[i]
        if dep.tag is not None or dep.workflow is None:
            node.tag_inputs.append(resolve_tag(state, dep, node.workflow))
            continue
        if dep.workflow not in names:
            raise _missing(project, node.workflow, dep.workflow, names)
        if dep.workflow not in node.upstream:
            node.upstream.append(dep.workflow)
        if dep.workflow in nodes:
            continue
        if dep.workflow in on_path:
            path = [n.workflow for n, _ in stack]
            raise _cycle(project, [*path[path.index(dep.workflow) :], dep.workflow])
        on_path.add(dep.workflow)
        stack.append((make(dep.workflow), 0))
    unknown = sorted(k for k in overrides if find_variable(dict.fromkeys(known_vars, ""), k) is None)
    if unknown:
        hint = ", ".join(sorted(known_vars)) or "none"
        raise UsageError(
            f"unknown variable '--{unknown[0]}' for workflow '{target}'", hint=f"its variables: {hint}"
        )
    return order


def dependency_problems(project: Project) -> list[ConfigError]:
    """What `run` would refuse in the workflows' `depends-on` (read with default variables): workflows that
    don't exist, a workflow depending on itself, cycles. Workflows that don't read at all are skipped."""
    names = project.names()
    known = set(names)
    edges: dict[str, list[str]] = {}
    problems: list[ConfigError] = []
    for name in names:
        spec = project.default_spec(name)
        if spec is None:
            continue
        edges[name] = []
        for dep in spec.depends_on:
            if dep.tag is not None or dep.workflow is None:
                continue
            if dep.workflow not in known:
                problems.append(_missing(project, name, dep.workflow, known))
            elif dep.workflow == name:
                problems.append(_cycle(project, [name, name]))
            elif dep.workflow not in edges[name]:
                edges[name].append(dep.workflow)
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    for root in edges:
        if root in state:
            continue
        state[root] = 1
        stack: list[tuple[str, int]] = [(root, 0)]
        while stack:
            name, i = stack[-1]
            out = edges.get(name, [])
            if i == len(out):
                stack.pop()
                state[name] = 2
                continue
            stack[-1] = (name, i + 1)
            up = out[i]
            if state.get(up) == 1:
                path = [n for n, _ in stack]
                problems.append(_cycle(project, [*path[path.index(up) :], up]))
            elif up not in state and up in edges:
                state[up] = 1
                stack.append((up, 0))
    return problems


def _missing(project: Project, name: str, dep: str, names: set[str]) -> ConfigError:
    file, line = project.dependency_line(name)
    return ConfigError(
        f"workflow '{name}' depends on '{dep}', which is not a workflow of this repo",
        file=file,
        line=line,
        hint=_near(dep, names) or "check `depends-on`",
    )


def _cycle(project: Project, cycle: list[str]) -> ConfigError:
    file, line = project.dependency_line(cycle[-2])
    if len(cycle) == 2:
        return ConfigError(
            f"workflow '{cycle[0]}' depends on itself", file=file, line=line, hint="remove that dependency"
        )
    return ConfigError(
        f"workflows depend on each other in a cycle: {' → '.join(cycle)}",
        file=file,
        line=line,
        hint="remove one of these dependencies",
    )


def resolve_tag(state: State, dep: DependencySpec, workflow: str) -> TagInput:
    """The finished jobs behind `W:tag` or `:tag`."""
    assert dep.tag is not None
    tag = state.tag(dep.tag)
    if tag is None:
        from dstack.shared_tags import import_tag
        from dstack.store import open_object_store

        if import_tag(state, open_object_store(state), dep.tag):
            tag = state.tag(dep.tag)
    if tag is None:
        raise ConfigError(
            f"workflow '{workflow}' depends on '{dep.label()}', but there is no tag '{dep.tag}'",
            hint=f"run the workflow and `dstack tags add {dep.tag} RUN`, or see `dstack tags list`",
        )
    jobs = [j for j in state.jobs(tag.run_id) if j.status in ("done", "reused") and j.manifest]
    if dep.workflow:
        jobs = [j for j in jobs if j.workflow == dep.workflow]
        if not jobs:
            raise ConfigError(
                f"workflow '{workflow}' depends on '{dep.label()}', but run {tag.run_name} "
                f"(tag '{dep.tag}') has no finished job of workflow '{dep.workflow}'",
                hint=f"depend on ':{dep.tag}' for all of that run's artifacts",
            )
    return TagInput(dep.label(), jobs)


def filter_code(files: Manifest, working_subdir: str, include: list[str] | None) -> Manifest:
    """The repo files a job depends on: all, or those matching `depends-on: repo: include:` globs (the
    same files every runner puts in the job's working tree: dstack.repo.working_tree)."""
    from dstack.repo import working_tree

    return working_tree(files, working_subdir, include)


def compute_keys(
    nodes: list[Node], files: Manifest, working_subdir: str, files_digest: str | None = None
) -> None:
    """Each job's key: its spec, variables, the repo files it depends on, and its inputs' keys."""
    from dstack.hashing import digest_bytes

    keys: dict[str, str] = {}
    all_files = files_digest or files.digest()
    for node in nodes:
        include = node.spec.repo_include
        code_digest = all_files if include is None else filter_code(files, working_subdir, include).digest()
        material = {
            "workflow": node.workflow,
            "spec": node.spec.key_material(),
            "code": code_digest,
            "subdir": posixpath.normpath(working_subdir),
            "upstream": sorted(keys[u] for u in node.upstream),
            "tags": sorted(j.key or j.manifest or "" for t in node.tag_inputs for j in t.jobs),
        }
        node.key = digest_bytes(json.dumps(material, sort_keys=True).encode())
        node.upstream_keys = [keys[u] for u in node.upstream]
        keys[node.workflow] = node.key


def load_manifest(store: ObjectStore, name: str | None) -> Manifest:
    from dstack.store.objects import Manifest

    return store.get_manifest(name) if name else Manifest(entries=[])


def _near(name: str, names: set[str]) -> str | None:
    import difflib

    match = difflib.get_close_matches(name, sorted(names), n=1)
    return f"did you mean '{match[0]}'?" if match else None
