"""The model schema document and the per-request check (pure: no runtime involved)."""

from __future__ import annotations

import copy
import re
from typing import Any

import numpy as np
import pytest

from agent.model import InputChecker, ModelRef, ModelSchema, RequestError, SchemaError
from agent.model.identity import InvalidModelRefError

DOC: dict[str, Any] = {
    "format": 1,
    "model": "toy",
    "version": 3,
    "runtime": "onnx",
    "quantization": "int8",
    "inputs": [
        {"name": "x", "dtype": "float32", "shape": [-1, 3], "features": [
            {"name": "a", "min": 0.0, "max": 1.0, "out_of_range": "serve", "non_finite": "reject"},
            {"name": "b", "min": -5.0, "max": 5.0, "out_of_range": "reject", "non_finite": "reject"},
            {"name": "c", "min": None, "max": None, "out_of_range": "serve", "non_finite": "serve"},
        ]},
    ],
    "outputs": [{"name": "y", "dtype": "float32", "shape": [-1, 2], "labels": ["no", "yes"]}],
    "metadata": {"dataset": "toy"},
}


def checker() -> InputChecker:
    return InputChecker(ModelSchema.from_dict(DOC))


def test_schema_round_trips() -> None:
    s = ModelSchema.from_dict(DOC)
    assert s.to_dict() == DOC
    assert ModelSchema.from_dict(s.to_dict()) == s


@pytest.mark.parametrize(
    ("path", "value", "field"),
    [
        (("format",), 2, "schema.format"),
        (("model",), "Bad/Name", "invalid model name"),
        (("version",), True, "invalid model version"),
        (("version",), "3", "invalid model version"),
        (("runtime",), "torch", "schema.runtime"),
        (("inputs", 0, "dtype"), "complex64", "schema.inputs[0].dtype"),
        (("inputs", 0, "shape"), [-1, 0], "schema.inputs[0].shape"),
        (("inputs", 0, "shape"), [-1, 4], "schema.inputs[0].features has 3 entries"),
        (("inputs", 0, "features", 1, "min"), 10.0, "min 10.0 is greater than max"),
        (("inputs", 0, "features", 1, "max"), float("nan"), "schema.inputs[0].features[1].max"),
        (("inputs", 0, "features", 0, "out_of_range"), "clip", "schema.inputs[0].features[0].out_of_range"),
        (("inputs", 0, "colour"), "red", "unknown key(s) colour"),
        (("outputs",), [], "schema.outputs must be a non-empty list"),
    ],
)
def test_invalid_schema_names_the_field(path: tuple[Any, ...], value: Any, field: str) -> None:
    doc = copy.deepcopy(DOC)
    target: Any = doc
    for p in path[:-1]:
        target = target[p]
    target[path[-1]] = value
    with pytest.raises(SchemaError, match=re.escape(field)):
        ModelSchema.from_dict(doc)


def test_clean_request_passes_fast_path() -> None:
    assert checker().check({"x": np.array([[0.5, 0.0, 100.0]], dtype=np.float32)}) is None


def test_batch_of_any_size_accepted() -> None:
    assert checker().check({"x": np.zeros((7, 3), dtype=np.float32)}) is None


@pytest.mark.parametrize(
    ("inputs", "code", "field"),
    [
        ({"x": np.zeros((1, 3), dtype=np.float64)}, "dtype_mismatch", "x"),
        ({"x": np.zeros((1, 4), dtype=np.float32)}, "shape_mismatch", "x"),
        ({"x": np.zeros((3,), dtype=np.float32)}, "shape_mismatch", "x"),
        ({"x": np.zeros((0, 3), dtype=np.float32)}, "shape_mismatch", "x"),
        ({"z": np.zeros((1, 3), dtype=np.float32)}, "unknown_input", "z"),
        ({"x": np.zeros((1, 3), dtype=np.float32), "z": np.zeros(1)}, "unknown_input", "z"),
        ({}, "missing_input", "x"),
        ({"x": np.array([[np.nan, 0, 0]], dtype=np.float32)}, "non_finite", "x[0] a"),
        ({"x": np.array([[0.5, np.inf, 0]], dtype=np.float32)}, "non_finite", "x[1] b"),
        ({"x": np.array([[0.5, 6.0, 0]], dtype=np.float32)}, "out_of_range", "x[1] b"),
    ],
)
def test_bad_request_rejected_with_field(inputs: dict[str, Any], code: str, field: str) -> None:
    with pytest.raises(RequestError) as err:
        checker().check(inputs)
    assert err.value.code == code
    assert err.value.field == field
    assert field.split("[", maxsplit=1)[0] in str(err.value)


def test_out_of_range_served_and_flagged_when_policy_says_serve() -> None:
    flags = checker().check({"x": np.array([[2.0, 0.0, 0.0], [0.1, 0.0, 0.0]], dtype=np.float32)})
    assert flags is not None
    assert flags.out_of_range == ("a",)
    assert flags.non_finite == ()


def test_non_finite_served_and_flagged_when_policy_says_serve() -> None:
    flags = checker().check({"x": np.array([[0.5, 0.0, np.nan]], dtype=np.float32)})
    assert flags is not None
    assert flags.non_finite == ("c",)


def test_model_ref_rules() -> None:
    assert str(ModelRef.parse("cancer-mlp@12")) == "cancer-mlp@12"
    assert ModelRef("a", 10) > ModelRef("a", 9)  # integers, not strings
    for bad in ("a/b@1", "A@1", "x@", "x@1.2", "@1", "+@1"):
        with pytest.raises(InvalidModelRefError):
            ModelRef.parse(bad)
    with pytest.raises(InvalidModelRefError):
        ModelRef("a", -1)
