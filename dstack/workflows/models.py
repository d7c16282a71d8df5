"""Pydantic models of `.dstack/` files as written (raw forms) and of a workflow once normalized."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, WithJsonSchema

from dstack.names import NAME_PATTERN
from dstack.specs import ArtifactSpec, DependencySpec, PortsSpec, Resources, RetrySpec
from dstack.workflows.yamlfile import scalar_text


def _text(value: Any) -> Any:
    if isinstance(value, bool | int | float):
        return scalar_text(value)
    return value


Text = Annotated[str, BeforeValidator(_text)]
"""A string field that also takes numbers and booleans as written (`version: 3.10` is "3.10")."""

_SCALAR: dict[str, Any] = {"type": ["string", "number", "boolean", "null"]}
_STRINGS: dict[str, Any] = {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]}
_VERSION: dict[str, Any] = {
    "anyOf": [
        {"type": ["string", "number"]},
        {
            "type": "object",
            "properties": {"type": {"type": "string"}, "default": {"type": ["string", "number"]}},
        },
    ]
}
_GPU: dict[str, Any] = {
    "anyOf": [
        {"type": "integer", "minimum": 0},
        {"type": "string"},
        {
            "type": "object",
            "properties": {
                "count": {"type": "integer"},
                "name": {"type": "string"},
                "memory": {"type": ["string", "integer"]},
            },
            "additionalProperties": False,
        },
    ]
}
_DEP_ITEM: dict[str, Any] = {
    "anyOf": [
        {"type": "string", "description": "workflow, workflow:tag or :tag"},
        {"type": "object", "properties": {"workflow": {"type": "string"}, "tag": {"type": "string"}}},
        {"type": "object", "description": "workflow: tag", "maxProperties": 1},
    ]
}
_DEPS: dict[str, Any] = {
    "anyOf": [
        {"type": "array", "items": _DEP_ITEM},
        {
            "type": "object",
            "properties": {
                "repo": {
                    "type": "object",
                    "properties": {"include": {"type": "array", "items": {"type": "string"}}},
                },
                "workflows": {"type": "array", "items": _DEP_ITEM},
            },
            "additionalProperties": False,
        },
    ]
}
_ENV: dict[str, Any] = {
    "anyOf": [
        {"type": "object", "additionalProperties": _SCALAR},
        {"type": "array", "items": {"type": "string", "description": "KEY=VALUE, or KEY to pass yours"}},
    ]
}
_ARTIFACTS: dict[str, Any] = {
    "type": "array",
    "items": {
        "anyOf": [
            {"type": "string"},
            {
                "type": "object",
                "properties": {
                    "path": {"type": "string"},
                    "real-time": {"type": "boolean"},
                    "mount": {"type": "boolean"},
                },
                "required": ["path"],
            },
        ]
    },
}
_PORTS: dict[str, Any] = {
    "anyOf": [
        {"type": "integer", "minimum": 0, "maximum": 100},
        {"type": "array", "items": {"type": "integer", "minimum": 1, "maximum": 65535}, "maxItems": 100},
    ]
}
_RETRY: dict[str, Any] = {
    "anyOf": [
        {"type": "boolean"},
        {"type": "integer", "minimum": 0},
        {
            "type": "object",
            "properties": {
                "limit": {"type": "integer", "minimum": 0},
                "on": {"type": "array", "items": {"enum": ["error", "interruption", "host-lost"]}},
            },
        },
    ]
}


GpuField = Annotated[Any, WithJsonSchema(_GPU)]
DepsField = Annotated[Any, WithJsonSchema(_DEPS)]
EnvField = Annotated[Any, WithJsonSchema(_ENV)]
ArtifactsField = Annotated[Any, WithJsonSchema(_ARTIFACTS)]
PortsField = Annotated[Any, WithJsonSchema(_PORTS)]
RetryField = Annotated[Any, WithJsonSchema(_RETRY)]
VersionField = Annotated[Any, WithJsonSchema(_VERSION)]
StringsField = Annotated[Any, WithJsonSchema(_STRINGS)]
NameField = Annotated[Any, WithJsonSchema({"type": "string"})]
WorkflowNameField = Annotated[Text, WithJsonSchema({"type": "string", "pattern": NAME_PATTERN})]
TemplateField = Annotated[Any, WithJsonSchema({"anyOf": [{"type": "string"}, {"type": "object"}]})]
ListField = Annotated[Any, WithJsonSchema({"type": "array"})]


class _Raw(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=False)


class RawResources(_Raw):
    """`resources:` as written; `v100/gpu: 2` and `GPU:` are rewritten before validation."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"patternProperties": {"^[A-Za-z0-9_-]+/gpu$": {"type": "integer"}}},
    )

    cpu: Annotated[float | None, Field(json_schema_extra={"exclusiveMinimum": 0})] = None
    memory: Text | None = Field(None, description="64GB, 512MB, 1.5GiB; a bare number is MiB")
    gpu: GpuField = None
    shm_size: Text | None = None
    disk: Text | None = None
    interruptible: bool | None = None
    local: bool | None = Field(None, description="pin the job to this machine")
    remote: bool | None = None
    nodes: int | None = None


class RawWorkflow(_Raw):
    """One item of `workflows:` as written by researchers, 2021–2023."""

    name: WorkflowNameField
    help: Text | None = None
    provider: NameField = None
    template: TemplateField = None
    image: Text | None = None
    image_name: Text | None = None
    commands: StringsField = None
    working_dir: Text | None = None
    environment: EnvField = None
    env: EnvField = None
    artifacts: ArtifactsField = None
    depends_on: DepsField = Field(None, alias="depends-on")
    deps: DepsField = None
    resources: RawResources | None = None
    gpu: GpuField = None
    nodes: int | None = None
    ports: PortsField = None
    retry: RetryField = None
    inactivity: Annotated[Any, WithJsonSchema({"type": ["string", "integer", "boolean"]})] = None
    max_duration: Annotated[Any, Field(description="90s, 30m, 2h, 1d or seconds: then the job ends")] = None
    # python, torchrun
    file: Text | None = None
    script: Text | None = None
    python_script: Text | None = None
    args: StringsField = None
    requirements: Text | None = None
    version: VersionField = None
    python: VersionField = None
    # curl
    url: Text | None = None
    output: Text | None = None
    # streamlit, fastapi
    target: Text | None = None
    app: Text | None = None
    triggers: ListField = None


class WorkflowsFile(_Raw):
    """`.dstack/workflows.yaml` (or one of `.dstack/workflows/*.yaml`)."""

    model_config = ConfigDict(extra="forbid", title="dstack workflows.yaml")

    workflows: list[RawWorkflow] = Field(default_factory=list)
    templates: list[dict[str, Any]] | None = Field(None, description="named field sets for `template:`")


def field_keys(model: type[BaseModel]) -> list[str]:
    """The keys a raw model accepts, as written in YAML."""
    return [f.alias or name for name, f in model.model_fields.items()]


class ProjectSettings(BaseModel):
    """`.dstack/config.yaml`: this repo's default artifact store and cloud region."""

    model_config = ConfigDict(extra="forbid")

    backend: str | None = None
    bucket: str | None = None
    region: str | None = None


class CustomProviderDef(BaseModel):
    """A provider defined in `.dstack/providers.yaml`: a Docker image and commands."""

    name: str
    image: str | None = None
    commands: list[str] = Field(default_factory=list)
    file: str
    line: int


class Workflow(BaseModel):
    """A workflow once read: every form normalized, variables substituted; what a provider consumes."""

    name: str
    file: str
    line: int
    provider: str = "bash"
    help: str | None = None
    image: str | None = None
    commands: list[str] = Field(default_factory=list)  # shell lines, values already quoted
    working_dir: str = "."
    env: dict[str, str] = Field(default_factory=dict)
    passthrough_env: list[str] = Field(default_factory=list)
    artifacts: list[ArtifactSpec] = Field(default_factory=list)
    depends_on: list[DependencySpec] = Field(default_factory=list)
    repo_include: list[str] | None = None
    resources: Resources = Field(default_factory=Resources)
    ports: PortsSpec = Field(default_factory=PortsSpec)
    retry: RetrySpec | None = None
    inactivity_s: float | None = None  # `inactivity: 30m`; 0: off; None: the provider decides
    max_duration_s: int | None = None
    python_version: str | None = None
    requirements: str | None = None
    script: str | None = None
    args: str = ""  # a shell fragment, values already quoted
    url: str | None = None
    output: str | None = None
    target: str | None = None
    app: str | None = None
    triggers: list[Any] | None = None
    variables: dict[str, str] = Field(default_factory=dict)
    notices: list[str] = Field(default_factory=list)
