"""Finding and reading a repo's `.dstack/` folder: workflows, variables, providers and settings."""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dstack.errors import ConfigError, RepoError, UsageError
from dstack.workflows.variables import VariableSections, read_variable_sections
from dstack.workflows.yamlfile import YList, YMap, load_yaml, plain, scalar_text

if TYPE_CHECKING:
    from dstack.providers.base import Provider
    from dstack.specs import JobSpec
    from dstack.workflows.models import CustomProviderDef, ProjectSettings, Workflow

_TOP_KEYS = ["workflows", "templates"]


def load_project(cwd: Path) -> Project:
    """The project of the nearest folder holding `.dstack/`, from `cwd` up to the Git repo root."""
    cwd = Path(cwd).resolve()
    state_homes = {
        Path(os.environ.get("DSTACK_HOME", Path.home() / ".dstack")).resolve(),
        (Path.home() / ".dstack").resolve(),
    }
    for folder in (cwd, *cwd.parents):
        candidate = folder / ".dstack"
        if candidate.is_dir() and (candidate.resolve() not in state_homes or _has_workflows(candidate)):
            return Project(folder)
        if (folder / ".git").exists():
            break
    raise RepoError(f"no .dstack/ folder in {cwd} or above — run `dstack init`")


def _has_workflows(folder: Path) -> bool:
    return any((folder / n).exists() for n in ("workflows.yaml", "workflows.yml", "workflows"))


def _present(path: Path) -> bool:
    """Whether `path` is there in any form, a dangling link too (what is there but unreadable is an error)."""
    return os.path.lexists(path)


def _name_error(name: str, item: YMap, file: str) -> ConfigError | None:
    from dstack.names import name_hint, name_problem

    problem = name_problem(name, "workflow")
    line = item.line_of("name" if "name" in item else "id")
    return None if problem is None else ConfigError(problem, file=file, line=line, hint=name_hint(name))


@dataclass
class _Entry:
    name: str
    file: str
    line: int
    item: YMap
    error: ConfigError | None = None


class Project:
    """A repo's `.dstack/`: read once, then asked about its workflows by name."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.folder = self.root / ".dstack"
        self._entries: dict[str, _Entry] = {}
        self._templates: dict[str, YMap] = {}
        self._file_errors: list[ConfigError] = []
        self._errors: dict[str, ConfigError | None] = {}
        self._specs: dict[str, JobSpec] = {}
        for path in self._workflow_files():
            self._read_workflows_file(path)

    # -- reading -------------------------------------------------------------------------------

    def _display(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix()

    def _workflow_files(self) -> list[Path]:
        files = [self.folder / n for n in ("workflows.yaml", "workflows.yml") if _present(self.folder / n)]
        folder = self.folder / "workflows"
        if folder.is_dir():
            files += sorted(  # hidden special entries are editors' (Emacs' `.#x.yaml` lock links)
                p
                for p in folder.iterdir()
                if p.suffix in (".yaml", ".yml") and (p.is_file() or not p.name.startswith("."))
            )
        return files

    def check_files(self) -> None:
        """Raise the first `.dstack/` file that can't be read as a file (a directory, FIFO, dangling link)."""
        from dstack.workflows.yamlfile import NOT_A_FILE_HINT, config_file_problem

        names = ("configs.yaml", "variables.yaml", "providers.yaml", "config.yaml")
        for path in [*self._workflow_files(), *(self.folder / n for n in names if _present(self.folder / n))]:
            problem = config_file_problem(path)
            if problem is not None:
                raise ConfigError(problem, file=self._display(path), hint=NOT_A_FILE_HINT)

    def _read_workflows_file(self, path: Path) -> None:
        file = self._display(path)
        try:
            data = load_yaml(path, file)
        except ConfigError as e:
            self._file_errors.append(e)
            return
        if data is None:
            return
        if not isinstance(data, YMap):
            self._file_errors.append(
                ConfigError(
                    "expected 'workflows:' at the top",
                    file=file,
                    line=1,
                    hint="write `workflows:` followed by a list of workflows",
                )
            )
            return
        for key, line, first in data.dups:
            self._file_errors.append(
                ConfigError(
                    f"duplicate key '{key}' (first at line {first})",
                    file=file,
                    line=line,
                    hint="merge them into one",
                )
            )
        for key in data:
            if key not in _TOP_KEYS and not key.startswith("x-"):  # `x-…: &anchor` holds shared fields
                from dstack.workflows.normalize import suggest

                hint = suggest(key, _TOP_KEYS) or "only 'workflows:' (and 'templates:') belong at the top"
                self._file_errors.append(
                    ConfigError(f"unknown field '{key}'", file=file, line=data.line_of(key), hint=hint)
                )
        for key in ("templates", "workflows"):
            items = data.get(key)
            if items is None:
                continue
            if not isinstance(items, YList):
                self._file_errors.append(
                    ConfigError(f"'{key}' must be a list", file=file, line=data.line_of(key))
                )
                continue
            for i, item in enumerate(items):
                self._read_item(key, item, file, items.line_of(i))

    def _read_item(self, key: str, item: Any, file: str, line: int) -> None:
        if not isinstance(item, YMap):
            what = "empty item" if item is None else f"{plain(item)!r} is not a workflow"
            self._file_errors.append(
                ConfigError(
                    f"{what} in '{key}'",
                    file=file,
                    line=line,
                    hint="each item is a mapping that starts with `name:`",
                )
            )
            return
        raw_name = item.get("name", item.get("id"))
        if raw_name is None or isinstance(raw_name, dict | list):
            self._file_errors.append(
                ConfigError(f"an item of '{key}' has no name", file=file, line=line, hint="add `name: …`")
            )
            return
        name = scalar_text(raw_name)
        if key == "templates":
            self._templates[name] = item
            return
        self._templates.setdefault(name, item)
        first = self._entries.get(name)
        if first is not None:
            first.error = first.error or ConfigError(
                f"workflow '{name}' is defined twice: {first.file}:{first.line} and {file}:{line}",
                file=file,
                line=line,
                hint="rename or remove one of them",
            )
            return
        self._entries[name] = _Entry(name, file, line, item, _name_error(name, item, file))

    @cached_property
    def _variable_sections(self) -> VariableSections | ConfigError:
        sections = VariableSections()
        for name, top in (("configs.yaml", "configs"), ("variables.yaml", "variables")):
            path = self.folder / name
            if _present(path):
                try:
                    read_variable_sections(
                        load_yaml(path, self._display(path)), top, self._display(path), sections
                    )
                except ConfigError as e:
                    return e
        return sections

    @cached_property
    def _custom_providers(self) -> dict[str, CustomProviderDef] | ConfigError:
        from dstack.workflows.models import CustomProviderDef

        path = self.folder / "providers.yaml"
        if not _present(path):
            return {}
        file = self._display(path)
        try:
            data = load_yaml(path, file)
        except ConfigError as e:
            return e
        if isinstance(data, YMap) and set(data) <= {"providers"}:
            data = data.get("providers")
        if data is None:
            return {}
        if isinstance(data, YMap):  # name: {image, commands}
            items = YList(data.line)
            for key, value in data.items():
                entry = YMap(data.line_of(key))
                entry["name"] = key
                entry.update(value if isinstance(value, YMap) else {})
                items.append(entry)
                items.lines.append(data.line_of(key))
            data = items
        if not isinstance(data, YList):
            return ConfigError("expected a list of providers (name, image, commands)", file=file, line=1)
        out: dict[str, CustomProviderDef] = {}
        for i, item in enumerate(data):
            line = data.line_of(i)
            if not isinstance(item, YMap) or item.get("name") is None:
                return ConfigError(
                    "a provider needs a 'name'",
                    file=file,
                    line=line,
                    hint="write `- name: NAME`, `image: …`, `commands: [...]`",
                )
            for key in item:
                if key not in ("name", "image", "commands"):
                    from dstack.workflows.normalize import suggest

                    return ConfigError(
                        f"unknown field '{key}'",
                        file=file,
                        line=item.line_of(key),
                        hint=suggest(key, ["name", "image", "commands"]),
                    )
            commands = item.get("commands") or []
            commands = [commands] if isinstance(commands, str) else commands
            if not isinstance(commands, list) or any(
                c is None or isinstance(c, dict | list) for c in commands
            ):
                return ConfigError(
                    "'commands' must be a list of strings", file=file, line=item.line_of("commands")
                )
            image = item.get("image")
            out[scalar_text(item["name"])] = CustomProviderDef(
                name=scalar_text(item["name"]),
                image=None if image is None else scalar_text(image),
                commands=[scalar_text(c) for c in commands],
                file=file,
                line=line,
            )
        return out

    # -- asking --------------------------------------------------------------------------------

    def names(self) -> list[str]:
        """Workflow names in file order, broken ones included."""
        return list(self._entries)

    def load_errors(self) -> list[ConfigError]:
        """Problems that hide workflows: files that aren't YAML, items without a name, unknown top keys."""
        return list(self._file_errors)

    def _entry(self, name: str) -> _Entry:
        entry = self._entries.get(name)
        if entry is not None:
            return entry
        if self._file_errors:
            raise self._file_errors[0]
        near = difflib.get_close_matches(name, list(self._entries), n=1)
        known = ", ".join(self._entries) or "none"
        hint = f"did you mean '{near[0]}'?" if near else f"workflows: {known}"
        raise UsageError(f"unknown workflow '{name}'", hint=hint)

    def help(self, name: str) -> str | None:
        """The workflow's `help:` text, if any."""
        value = self._entry(name).item.get("help")
        return None if value is None or isinstance(value, dict | list) else scalar_text(value)

    def triggers(self, name: str) -> list[Any] | None:
        """The workflow's `triggers:` as written (kept and shown, never run automatically)."""
        value = self._entry(name).item.get("triggers")
        if value is None:
            return None
        value = plain(value)
        return value if isinstance(value, list) else [value]

    def variables(self, name: str) -> dict[str, str]:
        """The workflow's variables with their defaults: global, then its own, as strings."""
        self._entry(name)
        sections = self._variable_sections
        if isinstance(sections, ConfigError):
            raise sections
        return sections.for_workflow(name)

    def error(self, name: str) -> ConfigError | None:
        """What is wrong with this workflow (read with its default variables), or None."""
        if name not in self._errors:
            try:
                self._specs[name] = self.job_spec(name)
                self._errors[name] = None
            except ConfigError as e:
                self._errors[name] = e
        return self._errors[name]

    def default_spec(self, name: str) -> JobSpec | None:
        """The job spec with default variables, or None when the workflow has an error."""
        return None if self.error(name) else self._specs[name]

    def dependency_line(self, name: str) -> tuple[str, int]:
        """The file and line of the workflow's `depends-on` (or of the workflow itself)."""
        entry = self._entries[name]
        key = next((k for k in ("depends-on", "deps") if k in entry.item), "name")
        return entry.file, entry.item.line_of(key)

    def workflow(
        self, name: str, overrides: dict[str, str] | None = None, args: list[str] | None = None
    ) -> Workflow:
        """The normalized workflow, with variables substituted (before its provider makes a job spec)."""
        from dstack.providers import BUILTIN
        from dstack.workflows.normalize import normalize_workflow
        from dstack.workflows.variables import Substituter

        entry = self._entry(name)
        if entry.error:
            raise entry.error
        from dstack.workflows.variables import find_variable

        values = self.variables(name)
        unknown = [k for k in overrides or {} if find_variable(values, k) is None]
        if unknown:
            hint = (
                f"its variables: {', '.join(values)}"
                if values
                else "it has no variables (see .dstack/variables.yaml)"
            )
            raise UsageError(f"unknown variable '{unknown[0]}' for workflow '{name}'", hint=hint)
        values.update({find_variable(values, k) or k: v for k, v in (overrides or {}).items()})
        custom = self._custom_providers
        choices = sorted(set(BUILTIN) | (set(custom) if isinstance(custom, dict) else set()))
        wf = normalize_workflow(
            entry.item,
            file=entry.file,
            subst=Substituter(values, list(args or []), file=entry.file),
            templates=self._templates,
            is_provider=self._is_provider,
            provider_names=choices,
        )
        if isinstance(custom, dict) and wf.provider in custom and wf.provider in BUILTIN:
            d = custom[wf.provider]
            wf.notices.append(f"provider '{wf.provider}' comes from {d.file}:{d.line}, not the built-in one")
        return wf

    def _is_provider(self, name: str) -> bool:
        from dstack.providers import is_provider

        custom = self._custom_providers
        if isinstance(custom, dict):
            return name in custom or is_provider(name)
        if is_provider(name):
            return True
        raise custom  # the provider may be defined in the broken providers.yaml

    def _provider(self, name: str) -> Provider:
        from dstack.providers import get_provider
        from dstack.providers.custom import CustomProvider

        custom = self._custom_providers
        if isinstance(custom, dict) and name in custom:
            return CustomProvider(custom[name])
        return get_provider(name)

    def job_spec(
        self, name: str, overrides: dict[str, str] | None = None, args: list[str] | None = None
    ) -> JobSpec:
        """The job spec of workflow `name` with variables overridden and `run` arguments given."""
        from dstack.providers.base import ProviderContext

        wf = self.workflow(name, overrides, args)
        ctx = ProviderContext(root=self.root, variables=dict(wf.variables), args=list(args or []))
        return self._provider(wf.provider).job_spec(wf, ctx)

    @cached_property
    def settings(self) -> ProjectSettings:
        """`.dstack/config.yaml` (backend, bucket, region); raises ConfigError if it is malformed."""
        from dstack.workflows.models import ProjectSettings

        path = self.folder / "config.yaml"
        if not _present(path):
            return ProjectSettings()
        file = self._display(path)
        data = load_yaml(path, file)
        if data is None:
            return ProjectSettings()
        if not isinstance(data, YMap):
            raise ConfigError("expected a mapping (backend, bucket, region)", file=file, line=1)
        known = list(ProjectSettings.model_fields)
        for key in data:
            if key not in known:
                from dstack.workflows.normalize import suggest

                raise ConfigError(
                    f"unknown field '{key}'",
                    file=file,
                    line=data.line_of(key),
                    hint=suggest(key, known) or f"known fields: {', '.join(known)}",
                )
        return ProjectSettings(**{k: None if v is None else scalar_text(v) for k, v in data.items()})

    def validate(self) -> list[ConfigError]:
        """Every problem in `.dstack/`, in file and line order."""
        problems = list(self._file_errors)
        for source in (self._variable_sections, self._custom_providers):
            if isinstance(source, ConfigError):
                problems.append(source)
        sections = self._variable_sections
        if isinstance(sections, VariableSections):
            problems += sections.errors.values()
            for section, (file, line) in sections.lines.items():
                if section != "global" and section not in self._entries and not self._file_errors:
                    near = difflib.get_close_matches(section, list(self._entries), n=1)
                    problems.append(
                        ConfigError(
                            f"variables for unknown workflow '{section}'",
                            file=file,
                            line=line,
                            hint=f"did you mean '{near[0]}'?"
                            if near
                            else "remove the section or add the workflow",
                        )
                    )
        try:
            self.settings  # noqa: B018
        except ConfigError as e:
            problems.append(e)
        for name in self._entries:
            error = self.error(name)
            if error is not None:
                problems.append(error)
        from dstack.graph import dependency_problems

        problems += dependency_problems(self)
        unique: dict[str, ConfigError] = {}
        for problem in problems:
            unique.setdefault(str(problem), problem)
        return sorted(unique.values(), key=lambda e: (e.file or "", e.line or 0))
