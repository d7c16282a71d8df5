"""Reading a workflow's inputs and outputs: `artifacts`, `depends-on` (workflows, tags, `repo.include`)."""

from __future__ import annotations

from typing import Any

from dstack.specs import ArtifactSpec, DependencySpec
from dstack.workflows.reading import suggest
from dstack.workflows.resources_reading import ResourcesReader
from dstack.workflows.yamlfile import YList, YMap, plain, scalar_text


class InputsReader(ResourcesReader):
    """The artifacts and dependencies part of reading a workflow item."""

    def _artifacts(self) -> list[ArtifactSpec]:
        value = self.item.get("artifacts")
        if value is None:
            return []
        if isinstance(value, str | YMap):
            single = YList(self.at("artifacts"))
            single.append(value)
            single.lines.append(self.at("artifacts"))
            value = single
        if not isinstance(value, YList):
            self.fail("'artifacts' must be a list of paths", self.at("artifacts"))
        out = []
        known = ["path", "real-time", "real_time", "mount"]
        for i, entry in enumerate(value):
            line = value.line_of(i)
            if entry is None:
                self.fail("empty item in 'artifacts'", line, hint="remove the bare '-' line or give a path")
            if isinstance(entry, YMap):
                for key in entry:
                    if key not in known:
                        self.fail(
                            f"unknown field 'artifacts[{i}].{key}'",
                            entry.line_of(key),
                            hint=suggest(key, known),
                        )
                if entry.get("path") is None:
                    self.fail(f"'artifacts[{i}]' has no 'path'", line)
                flags = {k: entry.get(k, False) for k in ("real-time", "real_time", "mount")}
                for k, flag in flags.items():
                    if not isinstance(flag, bool):
                        self.fail(f"'artifacts[{i}].{k}' must be true or false", entry.line_of(k))
                path = scalar_text(entry["path"])
                spec = ArtifactSpec(
                    path="", real_time=flags["real-time"] or flags["real_time"], mount=flags["mount"]
                )
            elif isinstance(entry, list):
                self.fail(f"'artifacts[{i}]' must be a path", line)
            else:
                path, spec = scalar_text(entry), ArtifactSpec(path="")
            spec.path = self.subst.plain(path, "artifacts", line).strip()
            if not spec.path:
                self.fail("empty path in 'artifacts'", line)
            out.append(spec)
        return out

    def _dependencies_key(self, item: YMap) -> YMap:
        """`dependencies:` (the docs' name from mid-2021 to February 2022) is `depends-on:`."""
        if "dependencies" not in item:
            return item
        for other in ("depends-on", "deps"):
            if item.get(other) is not None:
                self.fail(f"'dependencies' and '{other}' both set", self.at(other), hint="keep one of them")
        out = YMap(item.line)
        out.dups = item.dups
        for key, value in item.items():
            name = "depends-on" if key == "dependencies" else key
            out[name] = value
            out.lines[name] = item.line_of(key)
        return out

    def _dependencies(self) -> tuple[list[DependencySpec], list[str] | None]:
        if self.item.get("depends-on") is not None and self.item.get("deps") is not None:
            self.fail("'depends-on' and 'deps' both set", self.at("deps"), hint="keep one of them")
        key = "deps" if self.item.get("deps") is not None else "depends-on"
        value = self.item.get(key)
        include: list[str] | None = None
        if value is None:
            return [], None
        if isinstance(value, YMap):
            self._check_keys(value, ["repo", "workflows"], f"{key}.")
            repo = value.get("repo")
            if repo is not None:
                if not isinstance(repo, YMap):
                    self.fail(f"'{key}.repo' must be a mapping with 'include'", value.line_of("repo"))
                self._check_keys(repo, ["include"], f"{key}.repo.")
                globs = repo.get("include") or []
                if not isinstance(globs, list) or any(not isinstance(g, str) for g in globs):
                    self.fail(f"'{key}.repo.include' must be a list of globs", repo.line_of("include"))
                include = [self.subst.plain(g, f"{key}.repo.include", repo.line_of("include")) for g in globs]
            items = value.get("workflows") or YList(value.line)
            where = f"{key}.workflows"
        else:
            items, where = value, key
        if not isinstance(items, YList):
            self.fail(f"'{where}' must be a list of workflows", self.at(key))
        assert isinstance(items, YList)
        return [self._dependency(entry, items.line_of(i), where) for i, entry in enumerate(items)], include

    def _dependency(self, entry: Any, line: int, where: str) -> DependencySpec:
        if entry is None:
            self.fail(f"empty item in '{where}'", line, hint="remove the bare '-' line or name a workflow")
        workflow: str | None
        tag: str | None = None
        if isinstance(entry, YMap):
            if entry and set(entry) <= {"workflow", "tag"}:
                workflow = scalar_text(entry["workflow"]) if entry.get("workflow") is not None else None
                tag = scalar_text(entry["tag"]) if entry.get("tag") is not None else None
            elif len(entry) == 1:  # `- prepare: latest` means prepare:latest
                workflow, tag_value = next(iter(entry.items()))
                tag = scalar_text(tag_value) if tag_value is not None else None
            else:
                self.fail(
                    f"can't read {plain(entry)!r} in '{where}'",
                    line,
                    hint="write `workflow`, `workflow:tag`, `:tag`, {workflow: W} or {tag: T}",
                )
        elif isinstance(entry, list):
            self.fail(f"nested list in '{where}'", line, hint="write one workflow per '-' line")
        else:
            text = self.subst.plain(scalar_text(entry), where, line).strip()
            workflow, _, tag = text.partition(":") if ":" in text else (text, "", None)
        workflow = workflow.strip() or None if workflow else None
        tag = tag.strip() or None if tag else None
        if workflow is None and tag is None:
            self.fail(f"empty dependency in '{where}'", line)
        if workflow and "/" in workflow:
            self.fail(
                f"'{workflow}' is another repository's workflow: not supported",
                line,
                hint="copy that workflow into this repo, or depend on a tag of its run",
            )
        return DependencySpec(workflow=workflow, tag=tag)
