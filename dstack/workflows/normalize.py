"""From one `workflows:` item as written (any of the 2021–2023 forms) to a normalized `Workflow`."""

from __future__ import annotations

import posixpath
import re
import shlex
from collections.abc import Callable, Mapping
from typing import Any

from pydantic import ValidationError

from dstack.errors import ConfigError
from dstack.specs import RetrySpec
from dstack.workflows.inputs_reading import InputsReader
from dstack.workflows.models import RawWorkflow, Workflow, field_keys
from dstack.workflows.reading import canonical_keys, suggest, validated
from dstack.workflows.variables import Substituter, is_identifier
from dstack.workflows.yamlfile import YList, YMap, find_duplicates, plain, scalar_text

_PRE_RELEASE = {
    "id": "rename 'id' to 'name'",
    "params": "move 'params' to .dstack/variables.yaml under the workflow's name",
}
_VERSION = re.compile(r"^\d+(\.\d+){0,2}$")
_SQUEEZED = re.compile(r"^([A-Za-z_][\w./-]*):(\S+)$")
_CLOSED_EXPR = re.compile(r"\$\{\{.*?\}\}")
WORKFLOW_KEYS = field_keys(RawWorkflow)


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


class _Reader(InputsReader):
    """The whole item: its fields here, inputs and artifacts in InputsReader, resources in ResourcesReader."""

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
        item = self.item = canonical_keys(item, WORKFLOW_KEYS)
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
            spec: RetrySpec = validated(RetrySpec, plain(value), self.file, line, "retry")
            if spec.limit < 0:
                self.fail(f"'retry.limit' must be 0 or more, not {spec.limit}", value.line_of("limit"))
            return spec
        self.fail("'retry' must be true, a number of retries or {limit, on}", line)

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
