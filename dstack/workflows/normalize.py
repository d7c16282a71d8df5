"""From one `workflows:` item as written (any of the 2021–2023 forms) to a normalized `Workflow`."""

from __future__ import annotations

import difflib
import math
import posixpath
import re
import shlex
from collections.abc import Callable, Mapping
from typing import Any, NoReturn

from pydantic import BaseModel, ValidationError

from dstack.errors import ConfigError
from dstack.specs import ArtifactSpec, DependencySpec, GpuSpec, PortsSpec, Resources, RetrySpec
from dstack.workflows.models import RawResources, RawWorkflow, Workflow, field_keys
from dstack.workflows.variables import Substituter, find_variable, is_identifier
from dstack.workflows.yamlfile import YList, YMap, find_duplicates, plain, scalar_text

_PRE_RELEASE = {
    "id": "rename 'id' to 'name'",
    "params": "move 'params' to .dstack/variables.yaml under the workflow's name",
}
_VERSION = re.compile(r"^\d+(\.\d+){0,2}$")
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b?)?\s*$", re.IGNORECASE)
_SIZE_FACTORS = {"k": 1 / 1024, "m": 1, "g": 1024, "t": 1024 * 1024}
_RESOURCE_REF = re.compile(r"\$(?:\{([A-Za-z_][A-Za-z0-9_-]*)\}|([A-Za-z_][A-Za-z0-9_]*))")
_SQUEEZED = re.compile(r"^([A-Za-z_][\w./-]*):(\S+)$")
_DECIMAL = re.compile(r"^\d+\.\d*$")
_GPU_SHORT = re.compile(r"^([A-Za-z0-9_-]+)/gpu$", re.IGNORECASE)
MAX_PORTS = 100
_CLOSED_EXPR = re.compile(r"\$\{\{.*?\}\}")
WORKFLOW_KEYS = field_keys(RawWorkflow)
RESOURCE_KEYS = field_keys(RawResources)


def suggest(name: str, choices: list[str]) -> str | None:
    """'did you mean …?' for a misspelled name, or None."""
    near = difflib.get_close_matches(name, choices, n=1, cutoff=0.6)
    if not near:
        near = [c for c in choices if c.lower() == name.lower()]
    return f"did you mean '{near[0]}'?" if near else None


def parse_size_mib(text: str) -> int:
    """`64GB`, `512MB`, `1.5GiB`, `4096` (MiB) → MiB; ValueError if it isn't a size."""
    m = _SIZE.match(text)
    if not m:
        raise ValueError(text)
    factor = _SIZE_FACTORS[(m.group(2) or "m")[0].lower()]
    return max(1, round(float(m.group(1)) * factor))


def parse_duration_s(text: str) -> int | None:
    """`90s`, `30m`, `2h`, `1d`, `600` (seconds) → seconds; None if it isn't a positive duration."""
    m = re.fullmatch(r"\s*(\d+)\s*([smhd]?)\s*", text.lower())
    if not m or int(m.group(1)) == 0:
        return None
    return int(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]


def normalize_workflow(
    item: YMap,
    *,
    file: str,
    subst: Substituter,
    templates: Mapping[str, YMap],
    is_provider: Callable[[str], bool],
    provider_names: list[str],
) -> Workflow:
    """Read one workflow item; raise one ConfigError (file:line) for the first problem."""
    return _Reader(item, file, subst, templates, is_provider, provider_names).read()


class _Reader:
    def __init__(
        self,
        item: YMap,
        file: str,
        subst: Substituter,
        templates: Mapping[str, YMap],
        is_provider: Callable[[str], bool],
        provider_names: list[str],
    ) -> None:
        self.item = item
        self.file = file
        self.subst = subst
        self.templates = templates
        self.is_provider = is_provider
        self.provider_names = provider_names

    def fail(self, message: str, line: int | None = None, hint: str | None = None) -> NoReturn:
        raise ConfigError(message, file=self.file, line=line or self.item.line, hint=hint)

    def at(self, key: str) -> int:
        return self.item.line_of(key)

    # -- the whole item ------------------------------------------------------------------------

    def read(self) -> Workflow:
        item = self.item
        old = [k for k in _PRE_RELEASE if k in item]
        if old:
            self.fail(
                f"pre-release syntax ({', '.join(repr(k) for k in old)})",
                self.at(old[0]),
                hint="; ".join(_PRE_RELEASE[k] for k in old),
            )
        for key, line, first in find_duplicates(item):
            self.fail(
                f"duplicate key '{key}' (first at line {first})",
                line,
                hint="YAML keeps only the last one: remove or rename one of them",
            )
        self.item = item = self._merge_template(item)
        item = self.item = _canonical_keys(item, WORKFLOW_KEYS)
        item = self.item = self._dependencies_key(item)
        item = self.item = self._resource_variables(item)
        self._check_keys(item, WORKFLOW_KEYS, "")
        for text, line in _unclosed_expressions(item):
            self.fail(f"unclosed '${{{{' in {text!r}", line, hint="close it with '}}', e.g. ${{ name }}")
        if isinstance(item.get("resources"), YMap):
            item["resources"] = self._resources_keys(item["resources"])
        try:
            raw = RawWorkflow.model_validate(item)
        except ValidationError as e:
            raise self._pydantic_error(e) from None
        env, passthrough = self._environment()
        deps, include = self._dependencies()
        name = raw.name
        wf = Workflow(
            name=name,
            file=self.file,
            line=item.line,
            provider=self._provider(),
            help=raw.help,
            image=self._image(raw),
            commands=self._commands(),
            working_dir=self._working_dir(raw),
            env=env,
            passthrough_env=passthrough,
            artifacts=self._artifacts(),
            depends_on=deps,
            repo_include=include,
            resources=self._resources(raw),
            ports=self._ports(),
            retry=self._retry(),
            inactivity_s=self._inactivity(),
            max_duration_s=self._max_duration(),
            python_version=self._python_version(),
            requirements=self._plain(raw.requirements, "requirements"),
            script=self._script(raw),
            args=self._args(),
            url=self._plain(raw.url, "url"),
            output=self._plain(raw.output, "output"),
            target=self._plain(raw.target, "target"),
            app=self._plain(raw.app, "app"),
            variables=dict(self.subst.variables),
        )
        if item.get("triggers") is not None:
            from dstack.triggers.model import parse_triggers

            unknown: list[ConfigError] = []  # kinds dstack doesn't run are kept, with a notice
            parse_triggers(name, item["triggers"], self.file, self.at("triggers"), unknown)
            triggers = plain(item["triggers"])
            wf.triggers = triggers if isinstance(triggers, list) else [triggers]
            wf.notices.append(
                f"workflow '{name}' has triggers: `dstack triggers install` makes them start runs "
                "(`dstack triggers` shows what is installed)"
            )
            wf.notices += [f"{e}; it is kept but never run" for e in unknown]
        return wf

    def _merge_template(self, item: YMap) -> YMap:
        template = item.get("template")
        if template is None:
            return item
        if isinstance(template, str):
            source = self.templates.get(template)
            if source is None:
                self.fail(
                    f"unknown template '{template}'",
                    self.at("template"),
                    hint=suggest(template, list(self.templates)) or "define it under 'templates:'",
                )
        elif isinstance(template, YMap):
            source = template
        else:
            self.fail("'template' must be a template's name or a mapping of fields", self.at("template"))
        merged = YMap(item.line)
        for key, value in source.items():
            if key not in ("name", "help", "template"):
                merged[key] = value
                merged.lines[key] = source.line_of(key)
        for key, value in item.items():
            if key != "template":
                merged[key] = value
                merged.lines[key] = item.line_of(key)
        return merged

    def _check_keys(self, mapping: YMap, known: list[str], prefix: str) -> None:
        for key in mapping:
            if key not in known:
                self.fail(f"unknown field '{prefix}{key}'", mapping.line_of(key), hint=suggest(key, known))

    def _resources_keys(self, res: YMap) -> YMap:
        canon = _canonical_keys(res, RESOURCE_KEYS)
        out = YMap(res.line)
        for key, value in canon.items():
            line = canon.line_of(key)
            short = _GPU_SHORT.match(key)
            if short:  # `v100/gpu: 2`
                if "gpu" in canon:
                    self.fail(f"'resources.{key}' and 'resources.gpu' both set", line, hint="keep one")
                gpu = YMap(line)
                gpu["count"], gpu["name"] = value, short.group(1)
                value, key = gpu, "gpu"
            out[key] = value
            out.lines[key] = line
        self._check_keys(out, RESOURCE_KEYS, "resources.")
        return out

    def _resource_variables(self, item: YMap) -> YMap:
        """Variables in resources, as `${{ gpu }}` or as `$gpu` (`v100/gpu: $gpu`), replaced in a copy; a
        value that becomes a number is one (`gpu: $gpu` with gpu=2 is the count 2)."""

        def substituted(mapping: YMap, where: str) -> YMap:
            out = _copy_map(mapping)
            for key, value in mapping.items():
                if not where and key not in ("resources", "gpu", "nodes"):
                    continue
                if isinstance(value, YMap):
                    out[key] = substituted(value, f"{where}{key}.")
                elif isinstance(value, str) and "$" in value:
                    out[key] = self._resource_text(value, f"{where}{key}", mapping.line_of(key))
            return out

        return substituted(item, "")

    def _resource_text(self, value: str, where: str, line: int) -> Any:
        text = value
        for ref in reversed(list(_RESOURCE_REF.finditer(value))):
            found = self._resource_value(ref.group(1) or ref.group(2), where, line)
            text = text[: ref.start()] + found + text[ref.end() :]
        text = self.subst.plain(text, where, line).strip()
        return int(text) if text.isdigit() else float(text) if _DECIMAL.match(text) else text

    def _resource_value(self, name: str, where: str, line: int) -> str:
        found = find_variable(self.subst.variables, name)
        if found is None:
            known = ", ".join(self.subst.variables) or "none"
            self.fail(
                f"unknown variable '${name}' in '{where}'",
                line,
                hint=f"define it in .dstack/variables.yaml (this workflow's variables: {known})",
            )
        return self.subst.variables[found]

    def _pydantic_error(self, error: ValidationError) -> ConfigError:
        errors = sorted(error.errors(), key=lambda e: e["type"] != "extra_forbidden")
        first = errors[0]
        node: Any = self.item
        line, path = self.item.line, []
        for step in first["loc"]:
            if isinstance(node, YMap) and isinstance(step, str) and step in node:
                line, node = node.line_of(step), node[step]
                path.append(step)
            elif isinstance(node, YList) and isinstance(step, int) and step < len(node):
                line, node = node.line_of(step), node[step]
                path[-1:] = [f"{path[-1] if path else ''}[{step}]"]
        dotted = ".".join(path)
        message = first["msg"][0].lower() + first["msg"][1:]
        squeezed = (
            _SQUEEZED.match(node) if isinstance(node, str) and "dict" in first["type"] + message else None
        )
        if squeezed:  # `resources:` then `gpu:0` on the next line: one string, not a mapping
            return ConfigError(
                f"'{dotted}' is the text {node!r}, not a mapping",
                file=self.file,
                line=line,
                hint=f"YAML needs a space after ':': write `{squeezed.group(1)}: {squeezed.group(2)}`",
            )
        return ConfigError(f"'{dotted}': {message}", file=self.file, line=line)

    # -- fields --------------------------------------------------------------------------------

    def _plain(self, value: str | None, key: str) -> str | None:
        return None if value is None else self.subst.plain(value, key, self.at(key))

    def _text_list(self, key: str) -> list[tuple[str, int]]:
        """A string or a list of strings (no empty entries), with each one's line."""
        value = self.item.get(key)
        if value is None:
            return []
        if not isinstance(value, list):
            if isinstance(value, dict):
                self.fail(
                    f"'{key}' must be a list of strings",
                    self.at(key),
                    hint="quote lines that contain ': ' so YAML doesn't read a mapping",
                )
            return [(scalar_text(value), self.at(key))]
        out = []
        for i, entry in enumerate(value):
            line = value.line_of(i) if isinstance(value, YList) else self.at(key)
            if entry is None:
                self.fail(f"empty item in '{key}'", line, hint="remove the bare '-' line or write a value")
            if isinstance(entry, dict | list):
                self.fail(
                    f"'{key}[{i}]' must be a string",
                    line,
                    hint="quote lines that contain ': ' so YAML doesn't read a mapping",
                )
            out.append((scalar_text(entry), line))
        return out

    def _provider(self) -> str:
        item = self.item
        value = item.get("provider")
        line = self.at("provider")
        if value is None:
            if item.get("image") is not None or item.get("image_name") is not None:
                return "docker"
            if any(item.get(k) is not None for k in ("script", "python_script", "file")):
                return "python"
            return "bash"
        if isinstance(value, list):
            self.fail("'provider' takes one name, not a list", line, hint="write e.g. `provider: python`")
        if isinstance(value, dict):
            if "repo" in value:
                name = value.get("name") or "NAME"
                self.fail(
                    f"providers from a repository ({value['repo']}) are not supported",
                    line,
                    hint=f"define '{name}' in .dstack/providers.yaml (name, image, commands) "
                    f"and write `provider: {name}`",
                )
            self.fail("'provider' must be a name", line, hint="write e.g. `provider: bash`")
        name = scalar_text(value).strip()
        versioned = re.match(r"^python\s*(?:==|>=|~=|=)?\s*(\d+(?:\.\d+)*)$", name)
        if versioned:
            self.fail(
                f"'{name}' is not a provider",
                line,
                hint=f"write `provider: python` and `version: {versioned.group(1)}`",
            )
        if "@" in name or "==" in name:
            base = re.split(r"@|==", name)[0].strip()
            self.fail(
                f"provider versions and branches ('{name}') are not supported",
                line,
                hint=f"write `provider: {base}`",
            )
        if not self.is_provider(name):
            self.fail(
                f"unknown provider '{name}'",
                line,
                hint=suggest(name, self.provider_names) or f"use one of: {', '.join(self.provider_names)}",
            )
        return name

    def _image(self, raw: RawWorkflow) -> str | None:
        if raw.image is not None and raw.image_name is not None:
            self.fail("'image' and 'image_name' both set", self.at("image_name"), hint="keep 'image'")
        if raw.image is not None:
            return self._plain(raw.image, "image")
        return self._plain(raw.image_name, "image_name")

    def _commands(self) -> list[str]:
        return [self.subst.shell(text, "commands", line) for text, line in self._text_list("commands")]

    def _args(self) -> str:
        value = self.item.get("args")
        if isinstance(value, list):
            return " ".join(shlex.quote(self.subst.plain(t, "args", ln)) for t, ln in self._text_list("args"))
        return " ".join(self.subst.shell(t, "args", ln) for t, ln in self._text_list("args"))

    def _working_dir(self, raw: RawWorkflow) -> str:
        if raw.working_dir is None:
            return "."
        path = posixpath.normpath(self.subst.plain(raw.working_dir, "working_dir", self.at("working_dir")))
        if path.startswith("/") or path == ".." or path.startswith("../"):
            self.fail(
                f"'working_dir' {raw.working_dir!r} is outside the repo",
                self.at("working_dir"),
                hint="give a path relative to the folder holding .dstack/",
            )
        return path

    def _environment(self) -> tuple[dict[str, str], list[str]]:
        env: dict[str, str] = {}
        passthrough: list[str] = []
        for key in ("environment", "env"):
            value = self.item.get(key)
            if value is None:
                continue
            if isinstance(value, YMap):
                for name, v in value.items():
                    line = value.line_of(name)
                    if not is_identifier(name):
                        self.fail(f"'{name}' in '{key}' is not a valid environment variable name", line)
                    if isinstance(v, dict | list):
                        self.fail(f"'{key}.{name}' must be a single value", line, hint="quote it")
                    env[name] = self.subst.plain(scalar_text(v), f"{key}.{name}", line)
            elif isinstance(value, YList):
                for entry, line in self._text_list(key):
                    name, eq, v = entry.partition("=")
                    name = name.strip()
                    if not is_identifier(name):
                        self.fail(
                            f"'{entry}' in '{key}' is not KEY=VALUE",
                            line,
                            hint="write KEY=VALUE, or KEY alone to pass your own value",
                        )
                    if eq:
                        env[name] = self.subst.plain(v, f"{key}.{name}", line)
                    else:
                        passthrough.append(name)
            else:
                self.fail(f"'{key}' must be a mapping (KEY: value) or a list of KEY=VALUE", self.at(key))
        return env, passthrough

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

    def _resources(self, raw: RawWorkflow) -> Resources:
        res = raw.resources or RawResources.model_validate({})
        rmap = self.item.get("resources")
        rlines = rmap if isinstance(rmap, YMap) else YMap(self.at("resources"))
        out = Resources(
            cpu=res.cpu,
            interruptible=bool(res.interruptible),
            local=bool(res.local),
            remote=bool(res.remote),
        )
        for key, attr in (("memory", "memory_mib"), ("shm_size", "shm_size_mib"), ("disk", "disk_mib")):
            text = getattr(res, key)
            if text is not None:
                try:
                    setattr(out, attr, parse_size_mib(text))
                except ValueError:
                    self.fail(
                        f"'resources.{key}' {text!r} is not a size",
                        rlines.line_of(key),
                        hint="write e.g. 64GB, 512MB or 1.5GiB",
                    )
        gpu, gpu_line = res.gpu, rlines.line_of("gpu")
        if raw.gpu is not None:
            if gpu is not None:
                self.fail("'gpu' is set both at the top and in 'resources'", self.at("gpu"), hint="keep one")
            gpu, gpu_line = raw.gpu, self.at("gpu")
        if gpu is not None:
            out.gpu = self._gpu(gpu, gpu_line)
        if raw.nodes is not None and res.nodes is not None:
            self.fail("'nodes' is set both at the top and in 'resources'", self.at("nodes"), hint="keep one")
        nodes = raw.nodes if raw.nodes is not None else res.nodes
        if nodes is not None:
            if nodes < 1:
                self.fail(
                    "'nodes' must be at least 1", self.at("nodes") if raw.nodes else rlines.line_of("nodes")
                )
            out.nodes = nodes
        if out.cpu is not None and not (math.isfinite(out.cpu) and out.cpu > 0):
            self.fail(f"'resources.cpu' must be a number more than 0, not {out.cpu}", rlines.line_of("cpu"))
        return out

    def _gpu(self, value: Any, line: int) -> GpuSpec:
        if isinstance(value, bool):
            self.fail("'gpu' must be a count, a name or {count, name, memory}", line)
        if isinstance(value, int):
            if value < 0:
                self.fail("'gpu' count can't be negative", line)
            return GpuSpec(count=value)
        if isinstance(value, str):
            text = value.strip()
            if text.isdigit():
                return GpuSpec(count=int(text))
            name, _, count = text.partition(":")
            if count and not count.strip().isdigit():
                self.fail(f"'gpu' {value!r} is not NAME or NAME:COUNT", line)
            return GpuSpec(name=name.strip(), count=int(count) if count else 1)
        if isinstance(value, YMap):
            value = _canonical_keys(value, ["count", "name", "memory"])
            self._check_keys(value, ["count", "name", "memory"], "gpu.")
            count = value.get("count", 1)
            if isinstance(count, bool) or not isinstance(count, int) or count < 0:
                self.fail("'gpu.count' must be a whole number", value.line_of("count"))
            spec = GpuSpec(count=count)
            if value.get("name") is not None:
                spec.name = scalar_text(value["name"])
            if value.get("memory") is not None:
                try:
                    spec.memory_mib = parse_size_mib(scalar_text(value["memory"]))
                except ValueError:
                    self.fail(
                        f"'gpu.memory' {value['memory']!r} is not a size",
                        value.line_of("memory"),
                        hint="write e.g. 40GB",
                    )
            return spec
        self.fail("'gpu' must be a count, a name or {count, name, memory}", line)

    def _ports(self) -> PortsSpec:
        value = self.item.get("ports")
        line = self.at("ports")
        if value is None:
            return PortsSpec()
        if isinstance(value, str) and value.strip().isdigit():
            value = int(value)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            if value > MAX_PORTS:
                self.fail(f"'ports: {value}' asks for more than {MAX_PORTS} ports", line)
            return PortsSpec(count=value)
        if isinstance(value, YList):
            fixed = []
            for i, port in enumerate(value):
                if isinstance(port, str) and port.strip().isdigit():
                    port = int(port)
                if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
                    self.fail(f"'ports[{i}]' {plain(port)!r} is not a port number", value.line_of(i))
                fixed.append(port)
            if len(fixed) > MAX_PORTS:
                self.fail(f"'ports' lists more than {MAX_PORTS} ports", line)
            return PortsSpec(fixed=fixed)
        self.fail("'ports' must be a count (ports: 2) or a list of port numbers", line)

    def _inactivity(self) -> float | None:
        from dstack.inactivity import parse_duration

        value = self.item.get("inactivity")
        if value is None:
            return None
        seconds = None if isinstance(value, dict | list) else parse_duration(scalar_text(value))
        if seconds is None:
            self.fail(
                f"'inactivity' {plain(value)!r} is not a duration",
                self.at("inactivity"),
                hint="write e.g. `inactivity: 30m` (s, m, h, d) or `inactivity: off`",
            )
        return seconds

    def _retry(self) -> RetrySpec | None:
        value = self.item.get("retry")
        line = self.at("retry")
        if value is None or value is False:
            return None
        if value is True:
            return RetrySpec(limit=1)
        if isinstance(value, int) and value >= 0:
            return RetrySpec(limit=value)
        if isinstance(value, YMap):
            self._check_keys(value, ["limit", "on"], "retry.")
            spec: RetrySpec = _validated(RetrySpec, plain(value), self.file, line, "retry")
            if spec.limit < 0:
                self.fail(f"'retry.limit' must be 0 or more, not {spec.limit}", value.line_of("limit"))
            return spec
        self.fail("'retry' must be true, a number of retries or {limit, on}", line)

    def _max_duration(self) -> int | None:
        value = self.item.get("max_duration")
        if value is None or value is False:
            return None
        seconds = parse_duration_s(scalar_text(value)) if not isinstance(value, bool) else None
        if seconds is None:
            self.fail(
                f"'max_duration' {plain(value)!r} is not a duration",
                self.at("max_duration"),
                hint="write 90s, 30m, 2h, 1d, or a number of seconds",
            )
        return seconds

    def _python_version(self) -> str | None:
        found: dict[str, str] = {}
        for key in ("version", "python"):
            value = self.item.get(key)
            if value is None:
                continue
            if isinstance(value, YMap) and "default" in value:  # {type: string, default: 3.9}
                value = value["default"]
            text = scalar_text(value).strip() if not isinstance(value, dict | list) else ""
            if not _VERSION.match(text):
                self.fail(
                    f"'{key}' {plain(value)!r} is not a Python version",
                    self.at(key),
                    hint='write e.g. `version: 3.10` or `version: "3.10"`',
                )
            found[key] = text
        if len(set(found.values())) > 1:
            self.fail("'version' and 'python' disagree", self.at("python"), hint="keep one")
        return next(iter(found.values()), None)

    def _script(self, raw: RawWorkflow) -> str | None:
        given = [k for k in ("file", "script", "python_script") if getattr(raw, k) is not None]
        if len(given) > 1:
            self.fail(f"{' and '.join(repr(k) for k in given)} both set", self.at(given[1]), hint="keep one")
        return self._plain(getattr(raw, given[0]), given[0]) if given else None


def _canonical_keys(mapping: YMap, known: list[str]) -> YMap:
    """`GPU:` is `gpu:`: keys that differ from a known one only in case are renamed."""
    lower = {k.lower(): k for k in known}
    if all(k in known or k.lower() not in lower for k in mapping):
        return mapping
    out = YMap(mapping.line)
    out.dups = mapping.dups
    for key, value in mapping.items():
        name = key if key in known else lower.get(key.lower(), key)
        out[name] = value
        out.lines[name] = mapping.line_of(key)
    return out


def _copy_map(mapping: YMap) -> YMap:
    out = YMap(mapping.line)
    out.update(mapping)
    out.lines, out.dups = dict(mapping.lines), mapping.dups
    return out


def _validated(model: type[BaseModel], data: Any, file: str, line: int, where: str) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        loc = ".".join(str(p) for p in first["loc"])
        raise ConfigError(
            f"'{where}.{loc}': {first['msg'][0].lower()}{first['msg'][1:]}", file=file, line=line
        ) from None


def _unclosed_expressions(item: YMap) -> list[tuple[str, int]]:
    """Every string under `item` with a `${{` that no `}}` closes on its line, with its line."""
    found: list[tuple[str, int]] = []
    stack: list[tuple[Any, int]] = [(item, item.line)]
    while stack:
        value, line = stack.pop()
        if isinstance(value, YMap):
            stack.extend((v, value.line_of(k)) for k, v in value.items())
        elif isinstance(value, YList):
            stack.extend((v, value.line_of(i)) for i, v in enumerate(value))
        elif isinstance(value, str) and "${{" in _CLOSED_EXPR.sub("", value):
            found.append((value, line))
    return sorted(found, key=lambda f: f[1])
