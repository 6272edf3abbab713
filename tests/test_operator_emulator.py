"""The pieces tests/kube_emulator.py adds to kmock behave like the apiserver's."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from kube_emulator import LabelSelector, apply_merge_patch, merge_patch_between

LABELS = {"app": "engine", "tier": "gpu", "zone": "a"}


@pytest.mark.parametrize(
    ("selector", "matches"),
    [
        ("app=engine", True),
        ("app==engine,tier=gpu", True),
        ("app=engine,tier=cpu", False),
        ("app!=engine", False),
        ("missing!=x", True),
        ("tier", True),
        ("!tier", False),
        ("!missing", True),
        ("zone in (a, b)", True),
        ("zone notin (a,b)", False),
        ("zone in (b),app=engine", False),
    ],
)
def test_label_selectors(selector: str, matches: bool) -> None:
    assert LabelSelector(selector).matches(LABELS) is matches


def test_unparsable_selector_is_an_error() -> None:
    with pytest.raises(ValueError, match="unparsable"):
        LabelSelector("app=(x")


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=3),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=2), children, max_size=3)
    ),
    max_leaves=10,
)
objects = st.dictionaries(st.text(max_size=2), json_values, max_size=4)


def _without_nulls(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    return value


@given(objects, objects)
def test_merge_patch_between_turns_old_into_new(old: dict[str, Any], new: dict[str, Any]) -> None:
    # Stored objects hold no nulls in maps (a merge patch cannot express them).
    old, new = _without_nulls(old), _without_nulls(new)
    patch = merge_patch_between(old, new)
    assert apply_merge_patch(copy.deepcopy(old), patch) == new
    assert (patch == {}) is (old == new)
