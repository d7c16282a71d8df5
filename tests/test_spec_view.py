"""`dstack.spec_view`: a stored spec read without pydantic answers as `JobSpec.model_validate` does."""

from __future__ import annotations

import json

import pytest
from pydantic import BaseModel, ValidationError
from pydantic_core import PydanticUndefined

from dstack import specs
from dstack.spec_view import FIELDS, SpecView, spec_view, well_formed


def test_fields_and_defaults_are_those_of_the_models():
    for kind, fields in FIELDS.items():
        model: type[BaseModel] = getattr(specs, kind)
        assert set(fields) == set(model.model_fields), kind
        for name, info in model.model_fields.items():
            default = fields[name]
            if isinstance(default, (str, tuple)) and (default in FIELDS or isinstance(default, tuple)):
                continue  # a nested model: checked through the views below
            wanted = info.get_default(call_default_factory=True)
            assert (... if wanted is PydanticUndefined else wanted) == default, (kind, name)


def assert_same(view: object, real: object) -> None:
    if isinstance(real, BaseModel):
        assert isinstance(view, SpecView)
        for name in type(real).model_fields:
            assert_same(getattr(view, name), getattr(real, name))
    elif isinstance(real, list):
        assert isinstance(view, list) and len(view) == len(real)
        for v, r in zip(view, real, strict=True):
            assert_same(v, r)
    else:
        assert view == real


def test_a_view_reads_what_validation_gives():
    full = specs.JobSpec(
        workflow="train",
        commands=["echo hi"],
        env={"A": "1"},
        artifacts=[specs.ArtifactSpec(path="model", real_time=True)],
        depends_on=[specs.DependencySpec(workflow="prepare", tag="latest")],
        resources=specs.Resources(cpu=2, gpu=specs.GpuSpec(count=1, name="A100")),
        ports=specs.PortsSpec(count=2, fixed=[8888]),
        retry=specs.RetrySpec(limit=2),
        python=specs.PythonSpec(version="3.10"),
    )
    for stored in (json.loads(full.model_dump_json()), {"workflow": "bare"}):  # an older spec lacks keys
        assert well_formed("JobSpec", stored)  # read without pydantic
        assert_same(spec_view(stored), specs.JobSpec.model_validate(stored))


def test_a_typed_spec_is_its_own_view():
    typed = specs.JobSpec(workflow="w")
    assert spec_view(typed) is typed


def test_the_rest_is_the_real_model():
    stored = {"workflow": "w", "commands": ["x"]}
    view = spec_view(stored)
    assert view.key_material() == specs.JobSpec.model_validate(stored).key_material()
    view.commands = ["y"]  # a change goes to the validated model, never to the stored dict
    assert view.commands == ["y"] and stored["commands"] == ["x"]
    view.env["K"] = "v"
    assert "env" not in stored


def test_a_spec_not_of_the_stored_shape_fails_as_validation_does():
    for broken in ({"resources": "broken"}, {"artifacts": None}, {"retry": 3}, {"ports": {"count": "x"}}):
        with pytest.raises(ValidationError):
            spec_view({"workflow": "w", **broken})
