"""The stdlib schema validator: JSON Schema semantics, refusal of what it does not implement,
and agreement with jsonschema (kept as a test dependency) on mutated real netconfs."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cni_plugin import netconf
from cni_plugin.schema_validator import SchemaValidator, UnsupportedSchemaError, Violation
from cni_plugin.types import ERR_INVALID_CONFIG, CNIError
from tests.protocol.test_protocol import NETCONF

REPO = Path(__file__).resolve().parents[2]
SCHEMA: dict[str, Any] = json.loads((REPO / "cni_plugin" / "netconf.schema.json").read_text())


def calico_entries_of_shipped_conflists() -> list[dict[str, Any]]:
    """Each conflist's calico plugin as libcni hands it over (name and cniVersion injected)."""
    entries = []
    for path in sorted((REPO / "conf").glob("*.conflist")):
        conflist = json.loads(path.read_text())
        for plugin in conflist["plugins"]:
            if plugin["type"] == "calico":
                entries.append(
                    {"cniVersion": conflist["cniVersion"], "name": conflist["name"], **plugin}
                )
    return entries


VALID_NETCONFS = [*calico_entries_of_shipped_conflists(), NETCONF]


def subschemas(schema: dict[str, Any], prefix: tuple = ()) -> Iterator[tuple[tuple, dict]]:
    """Every instance location the schema constrains (two indexes per array), and how."""
    yield prefix, schema
    for name, sub in schema.get("properties", {}).items():
        yield from subschemas(sub, (*prefix, name))
    if "items" in schema:
        for index in (0, 1):
            yield from subschemas(schema["items"], (*prefix, index))


SUBSCHEMAS = dict(subschemas(SCHEMA))
PATHS = list(SUBSCHEMAS)
# One value of each JSON type, integral and fractional numbers apart.
ONE_OF_EACH_TYPE = [None, True, 0, 3.0, 2.5, "s", [], {}]


def values_on_the_edges(subschema: dict[str, Any]) -> list[Any]:
    """Values that just pass or just fail this subschema's keywords other than `type`."""
    values: list[Any] = []
    for keyword in ("minimum", "maximum", "exclusiveMinimum"):
        if keyword in subschema:
            limit = subschema[keyword]
            values += [limit - 1, limit, limit + 1, float(limit), limit - 0.5, limit + 0.5]
    for member in subschema.get("enum", []):
        values += [member, member.upper(), f"{member} ", False]
    if "minLength" in subschema:
        values += ["", "x" * subschema["minLength"]]
    if "pattern" in subschema:
        values += ["a/b", "/", "ab", "ab\n"]
    if "required" in subschema:
        values += [{"Other": 1}]
    return values


# Each location paired with each value worth trying there.
EDGE_CASES = [
    (path, value)
    for path, sub in SUBSCHEMAS.items()
    for value in values_on_the_edges(sub) + ONE_OF_EACH_TYPE
]
KEYS = st.sampled_from([*sorted({k for p in PATHS for k in p if isinstance(k, str)}), "Other"])
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-70000, 70000) | st.floats() | st.text(max_size=4),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(KEYS, children, max_size=3),
    max_leaves=6,
)


def set_at(doc: Any, path: tuple, value: Any) -> Any:
    """`doc` with `value` at `path`, making (or replacing) containers on the way."""
    if not path:
        return value
    head, rest = path[0], path[1:]
    container: dict | list = (
        doc
        if isinstance(doc, dict if isinstance(head, str) else list)
        else ({} if isinstance(head, str) else [])
    )
    if isinstance(container, list):
        while len(container) <= head:
            container.append({})
    child = container[head] if isinstance(container, list) else container.get(head)
    container[head] = set_at(child, rest, value)
    return container


def delete_at(doc: Any, path: tuple) -> Any:
    """`doc` without the key at `path`, if it has one there."""
    parent = doc
    for key in path[:-1]:
        if not isinstance(parent, dict) or key not in parent:
            return doc
        parent = parent[key]
    if isinstance(parent, dict):
        parent.pop(path[-1], None)
    return doc


MUTATIONS = st.one_of(
    st.sampled_from(EDGE_CASES).map(lambda case: ("set", *case)),
    st.tuples(st.just("set"), st.sampled_from(PATHS), JSON_VALUES),
    st.tuples(
        st.just("delete"), st.sampled_from([p for p in PATHS if p and isinstance(p[-1], str)])
    ),
)


@st.composite
def mutated_netconfs(draw: st.DrawFn) -> Any:
    doc = copy.deepcopy(draw(st.sampled_from(VALID_NETCONFS)))
    for mutation in draw(st.lists(MUTATIONS, min_size=1, max_size=4)):
        if mutation[0] == "set":
            doc = set_at(doc, mutation[1], mutation[2])
        else:
            doc = delete_at(doc, mutation[1])
    return doc


OURS = SchemaValidator(SCHEMA)
REFERENCE = jsonschema.Draft202012Validator(SCHEMA)


def reference_errors(doc: Any) -> list[Violation]:
    return [Violation(tuple(e.path), e.message) for e in REFERENCE.iter_errors(doc)]


@pytest.mark.parametrize("doc", VALID_NETCONFS, ids=lambda d: str(d.get("datastore_type")))
def test_shipped_and_fixture_netconfs_are_valid(doc: dict[str, Any]) -> None:
    assert list(OURS.iter_errors(doc)) == []
    assert reference_errors(doc) == []


def assert_agrees_with_jsonschema(doc: Any) -> list[Violation]:
    expected = reference_errors(doc)
    assert list(OURS.iter_errors(doc)) == expected, doc
    first = min(expected, key=lambda v: v.path) if expected else None
    assert OURS.first_error(doc) == first, doc
    return expected


def test_agrees_with_jsonschema_on_every_edge_case_of_every_netconf() -> None:
    """Each value worth trying at each location, one at a time, in each valid netconf."""
    messages = [
        v.message
        for doc in VALID_NETCONFS
        for path, value in EDGE_CASES
        for v in assert_agrees_with_jsonschema(set_at(copy.deepcopy(doc), path, value))
    ]
    # Meaningful only if the cases trip every keyword the schema uses.
    wordings = [
        "is not of type", "is not one of", "is a required property", "less than the minimum",
        "greater than the maximum", "less than or equal to the minimum", "should be non-empty",
        "does not match",
    ]  # fmt: skip
    assert [w for w in wordings if not any(w in m for m in messages)] == []


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated_netconfs())
def test_agrees_with_jsonschema_on_randomly_mutated_netconfs(doc: Any) -> None:
    assert_agrees_with_jsonschema(doc)


@pytest.mark.parametrize(
    ("schema", "instance", "message"),
    [
        ({"type": "integer"}, 3, None),
        ({"type": "integer"}, 3.0, None),
        ({"type": "integer"}, 3.5, "3.5 is not of type 'integer'"),
        ({"type": "integer"}, True, "True is not of type 'integer'"),
        ({"type": "integer"}, "abc", "'abc' is not of type 'integer'"),
        ({"type": "number"}, False, "False is not of type 'number'"),
        ({"type": "boolean"}, 1, "1 is not of type 'boolean'"),
        ({"type": ["string", "null"]}, 1, "1 is not of type 'string', 'null'"),
        ({"minimum": 0}, -1, "-1 is less than the minimum of 0"),
        ({"minimum": 0}, "-1", None),
        ({"maximum": 65535}, 65536, "65536 is greater than the maximum of 65535"),
        ({"exclusiveMinimum": 0}, 0, "0 is less than or equal to the minimum of 0"),
        ({"exclusiveMinimum": 0}, 0.001, None),
        ({"minLength": 1}, "", "'' should be non-empty"),
        ({"minLength": 2}, "a", "'a' is too short"),
        ({"minLength": 2}, 1, None),
        ({"pattern": "b"}, "abc", None),
        ({"pattern": "^[^/]+$"}, "../sh", "'../sh' does not match '^[^/]+$'"),
        ({"enum": ["a", "b"]}, "x", "'x' is not one of ['a', 'b']"),
        ({"enum": [1]}, True, "True is not one of [1]"),
        ({"enum": [1]}, 1.0, None),
        ({"required": ["name"]}, {}, "'name' is a required property"),
        ({"required": ["name"]}, [], None),
        ({"properties": {"a": {"type": "string"}}}, {"b": 1}, None),
    ],
)
def test_keyword_semantics_and_wording(schema: dict, instance: Any, message: str | None) -> None:
    expected = [Violation((), message)] if message else []
    assert list(SchemaValidator(schema).iter_errors(instance)) == expected


def test_errors_carry_the_path_of_keys_and_indexes() -> None:
    schema = {"properties": {"routes": {"items": {"required": ["dst"]}}}}
    errors = SchemaValidator(schema).iter_errors({"routes": [{"dst": "x"}, {"gw": "y"}]})
    assert list(errors) == [Violation(("routes", 1), "'dst' is a required property")]


@pytest.mark.parametrize(
    "schema",
    [
        {"type": "object", "additionalProperties": False},
        {"properties": {"mtu": {"type": "integer", "multipleOf": 2}}},
        {"properties": {"pools": {"items": {"format": "ipv4"}}}},
        {"properties": {"mtu": True}},
        {"$schema": "http://json-schema.org/draft-04/schema#", "type": "object"},
        {"properties": {"x": {"pattern": "("}}},
        {"properties": {"x": {"type": "int"}}},
    ],
)
def test_schema_it_cannot_enforce_is_refused_at_load(schema: dict) -> None:
    with pytest.raises(UnsupportedSchemaError):
        SchemaValidator(schema)


def test_netconf_reports_the_first_error_by_path_with_code_7() -> None:
    config = {"type": "calico", "mtu": "big", "ipam": {"type": "a/b"}}
    with pytest.raises(CNIError) as caught:
        netconf.validate(config)
    assert caught.value.code == ERR_INVALID_CONFIG
    assert caught.value.msg == "invalid network config: (top level): 'name' is a required property"

    config["name"] = "net"
    with pytest.raises(CNIError) as caught:
        netconf.validate(config)
    assert caught.value.msg == "invalid network config: ipam.type: 'a/b' does not match '^[^/]+$'"


def test_validating_a_netconf_does_not_import_jsonschema() -> None:
    code = (
        "import sys, cni_plugin.netconf as n;"
        "n.validate({'name': 'net', 'type': 'calico', 'ipam': {'type': 'calico-ipam'}});"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'jsonschema'))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]"
