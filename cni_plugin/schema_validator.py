"""A JSON Schema (2020-12) validator for just the keywords `netconf.schema.json` uses.

Why not `jsonschema`: importing it costs 75-110 ms (`-X importtime`, cumulative) in every
`calico` and `calico-ipam` process, more than the whole Go ADD. This module costs ~1 ms and
follows the spec's semantics for its keywords: `integer` accepts 3.0 but not true, booleans
are not numbers, `pattern` is an unanchored search, `properties` checks only present keys and
other keys are allowed. A schema using any other keyword is refused when it is loaded, so an
edit to the schema cannot silently go unenforced. Messages are worded like jsonschema's.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

DIALECT = "https://json-schema.org/draft/2020-12/schema"
# Keywords that never affect validity.
ANNOTATIONS = frozenset({"$schema", "$comment", "title", "description"})

Path = tuple[str | int, ...]


class UnsupportedSchemaError(ValueError):
    """The schema uses something this validator does not implement."""


@dataclass(frozen=True)
class Violation:
    """One failed keyword: where in the instance (keys and indexes) and why."""

    path: Path
    message: str


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_integer(value: Any) -> bool:
    return _is_number(value) and (isinstance(value, int) or value.is_integer())


_TYPE_TESTS: dict[str, Callable[[Any], bool]] = {
    "null": lambda value: value is None,
    "boolean": lambda value: isinstance(value, bool),
    "integer": _is_integer,
    "number": _is_number,
    "string": lambda value: isinstance(value, str),
    "array": lambda value: isinstance(value, list),
    "object": lambda value: isinstance(value, dict),
}


def _json_equal(a: Any, b: Any) -> bool:
    """JSON equality: 1 == 1.0, but true != 1 (Python's == says otherwise)."""
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(map(_json_equal, a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_json_equal(a[k], b[k]) for k in a)
    return a == b


# A compiled keyword: given the instance and its path, the violations it finds.
Check = Callable[[Any, Path], Iterator[Violation]]


def _single(message: Callable[[Any], str | None]) -> Check:
    """A keyword that yields at most one violation, at the instance itself."""

    def check(instance: Any, path: Path) -> Iterator[Violation]:
        text = message(instance)
        if text is not None:
            yield Violation(path, text)

    return check


def _require(ok: bool, where: str, what: str) -> None:
    if not ok:
        raise UnsupportedSchemaError(f"{where}: {what}")


def _type(value: Any, where: str) -> Check:
    names = value if isinstance(value, list) else [value]
    _require(bool(names) and all(n in _TYPE_TESTS for n in names), where, f"type {value!r}")
    tests = [_TYPE_TESTS[n] for n in names]
    wanted = ", ".join(repr(n) for n in names)
    return _single(lambda x: None if any(t(x) for t in tests) else f"{x!r} is not of type {wanted}")


def _enum(value: Any, where: str) -> Check:
    _require(isinstance(value, list), where, "enum must be an array")
    return _single(
        lambda x: (
            None if any(_json_equal(x, e) for e in value) else f"{x!r} is not one of {value!r}"
        )
    )


def _bound(fails: Callable[[Any, Any], bool], wording: str) -> Callable[[Any, str], Check]:
    """minimum / maximum / exclusiveMinimum: they apply to numbers only."""

    def compile_bound(limit: Any, where: str) -> Check:
        _require(_is_number(limit), where, "the limit must be a number")
        return _single(
            lambda x: f"{x!r} {wording} {limit!r}" if _is_number(x) and fails(x, limit) else None
        )

    return compile_bound


def _min_length(value: Any, where: str) -> Check:
    _require(_is_integer(value) and value >= 0, where, "minLength must be a count")
    wording = "should be non-empty" if value == 1 else "is too short"
    return _single(lambda x: f"{x!r} {wording}" if isinstance(x, str) and len(x) < value else None)


def _pattern(value: Any, where: str) -> Check:
    _require(isinstance(value, str), where, "pattern must be a string")
    try:
        regex = re.compile(value)
    except re.error as exc:
        raise UnsupportedSchemaError(f"{where}: pattern {value!r}: {exc}") from exc
    return _single(
        lambda x: (
            f"{x!r} does not match {value!r}"
            if isinstance(x, str) and not regex.search(x)
            else None
        )
    )


def _required(value: Any, where: str) -> Check:
    _require(
        isinstance(value, list) and all(isinstance(n, str) for n in value),
        where,
        "required must be an array of names",
    )

    def check(instance: Any, path: Path) -> Iterator[Violation]:
        if isinstance(instance, dict):
            for name in value:
                if name not in instance:
                    yield Violation(path, f"{name!r} is a required property")

    return check


def _properties(value: Any, where: str) -> Check:
    _require(isinstance(value, dict), where, "properties must be an object")
    subschemas = {name: _compile(sub, f"{where}/{name}") for name, sub in value.items()}

    def check(instance: Any, path: Path) -> Iterator[Violation]:
        if isinstance(instance, dict):
            for name, sub in subschemas.items():
                if name in instance:
                    yield from sub(instance[name], (*path, name))

    return check


def _items(value: Any, where: str) -> Check:
    sub = _compile(value, where)

    def check(instance: Any, path: Path) -> Iterator[Violation]:
        if isinstance(instance, list):
            for index, item in enumerate(instance):
                yield from sub(item, (*path, index))

    return check


_KEYWORDS: dict[str, Callable[[Any, str], Check]] = {
    "type": _type,
    "enum": _enum,
    "minimum": _bound(lambda x, limit: x < limit, "is less than the minimum of"),
    "maximum": _bound(lambda x, limit: x > limit, "is greater than the maximum of"),
    "exclusiveMinimum": _bound(
        lambda x, limit: x <= limit, "is less than or equal to the minimum of"
    ),
    "minLength": _min_length,
    "pattern": _pattern,
    "required": _required,
    "properties": _properties,
    "items": _items,
}


def _compile(schema: Any, where: str) -> Check:
    """One subschema as a single check running its keywords in the schema's order.

    The order matters only for which of several violations at one path comes first; it is
    the order jsonschema reports them in.
    """
    _require(isinstance(schema, dict), where, "a subschema must be an object")
    checks = []
    for keyword, value in schema.items():
        if keyword in ANNOTATIONS:
            continue
        _require(keyword in _KEYWORDS, where, f"keyword {keyword!r} is not implemented")
        checks.append(_KEYWORDS[keyword](value, f"{where}/{keyword}"))

    def check(instance: Any, path: Path) -> Iterator[Violation]:
        for keyword_check in checks:
            yield from keyword_check(instance, path)

    return check


class SchemaValidator:
    """A loaded schema; every keyword is checked for support and compiled up front."""

    def __init__(self, schema: dict[str, Any]) -> None:
        dialect = schema.get("$schema", DIALECT) if isinstance(schema, dict) else DIALECT
        _require(dialect == DIALECT, "#/$schema", f"dialect {dialect!r}, expected {DIALECT!r}")
        self._check = _compile(schema, "#")

    def iter_errors(self, instance: Any) -> Iterator[Violation]:
        """Every violation, subschemas in schema order (as jsonschema reports them)."""
        return self._check(instance, ())

    def first_error(self, instance: Any) -> Violation | None:
        """The violation with the smallest path (the first reported among equals), if any."""
        return min(self.iter_errors(instance), key=lambda v: v.path, default=None)
