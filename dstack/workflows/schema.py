"""The JSON schema of `.dstack/workflows.yaml`, for editors and `dstack schema`."""

from __future__ import annotations

from typing import Any


def json_schema() -> dict[str, Any]:
    """JSON schema of workflows.yaml, derived from the raw-form pydantic models."""
    from dstack.workflows.models import WorkflowsFile

    schema = WorkflowsFile.model_json_schema(by_alias=True)
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    return schema
