"""Calico selector syntax as used by IPPool nodeSelector / namespaceSelector."""

from __future__ import annotations

import pytest

from libcalico.selector import SelectorError, parse_selector

LABELS = {"zone": "us-east-1", "role": "worker", "k8s.io/arch": "amd64"}


@pytest.mark.parametrize(
    ("selector", "expected"),
    [
        ("", True),
        ("   ", True),
        ("all()", True),
        ("role == 'worker'", True),
        ('role == "master"', False),
        ("role != 'master'", True),
        ("missing != 'x'", True),
        ("role != 'worker'", False),
        ("has(role)", True),
        ("has(k8s.io/arch)", True),
        ("has(missing)", False),
        ("!has(missing)", True),
        ("!has(role)", False),
        ("role in {'worker', 'edge'}", True),
        ("role in {'edge'}", False),
        ("role in {}", False),
        ("role not in {'edge'}", True),
        ("missing not in {'edge'}", True),
        ("role not in {'worker'}", False),
        ("role == 'worker' && zone == 'us-east-1'", True),
        ("role == 'worker' && zone == 'eu'", False),
        ("role == 'master' || zone == 'us-east-1'", True),
        ("role == 'master' || zone == 'eu'", False),
        ("!(role == 'master' || zone == 'eu')", True),
        ("(role == 'master' || has(zone)) && !has(gpu)", True),
        ("role == 'master' || has(zone) && has(gpu)", False),
        ("zone starts with 'us-'", True),
        ("zone ends with '-1'", True),
        ("zone contains 'east'", True),
        ("missing contains 'east'", False),
    ],
)
def test_selector_evaluates_like_calico(selector: str, expected: bool) -> None:
    assert parse_selector(selector).matches(LABELS) is expected


def test_and_binds_tighter_than_or() -> None:
    # a || (b && c), not (a || b) && c
    assert parse_selector("has(role) || has(x) && has(y)").matches(LABELS)


@pytest.mark.parametrize(
    "selector",
    [
        "role ==",
        "role = 'worker'",
        "has(role",
        "(role == 'x'",
        "role in {worker}",
        "role 'worker'",
        "role == 'unterminated",
        "&& has(x)",
        "has(a) has(b)",
        "role not {'a'}",
        "role == 'a' #",
    ],
)
def test_invalid_selector_raises_clear_error(selector: str) -> None:
    with pytest.raises(SelectorError) as err:
        parse_selector(selector)
    assert "invalid selector" in str(err.value)
    assert repr(selector) in str(err.value)
