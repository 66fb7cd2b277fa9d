"""Properties of the shadow rules over generated JSON documents (hypothesis).

The example tests pin single cases; these check the laws the API and the devices rely on
for every document: merges are pure, an applied delta leaves nothing to do, and validation
fails only with a ShadowError, whatever JSON it is given.
"""

from __future__ import annotations

import copy
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.shadow import Limits, ShadowError, delta, merge, same, validate_patch

KEYS = st.text(alphabet="abcdef", min_size=1, max_size=3)
# orjson reads integers as signed or unsigned 64-bit: what a parsed body can hold
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8)
)
# filter_too_much trips on a loaded machine (generation retries), not on a property
SETTINGS = settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.filter_too_much]
)


def json_values(max_leaves: int = 30) -> st.SearchStrategy[Any]:
    """Any JSON value, depth bounded by the leaf budget."""
    return st.recursive(
        SCALARS,
        lambda children: (
            st.lists(children, max_size=4) | st.dictionaries(KEYS, children, max_size=4)
        ),
        max_leaves=max_leaves,
    )


def documents(allow_null: bool = True) -> st.SearchStrategy[dict[str, Any]]:
    leaves = SCALARS if allow_null else SCALARS.filter(lambda v: v is not None)
    values = st.recursive(
        leaves,
        lambda children: (
            st.lists(children, max_size=3) | st.dictionaries(KEYS, children, max_size=3)
        ),
        max_leaves=20,
    )
    return st.dictionaries(KEYS, values, max_size=5)


def without_nulls(value: Any) -> Any:
    """What a stored section looks like: merge never keeps a null in an object."""
    if isinstance(value, dict):
        return {k: without_nulls(v) for k, v in value.items() if v is not None}
    return value


def apply_delta(reported: dict[str, Any], difference: dict[str, Any]) -> dict[str, Any]:
    """Set every differing leaf of *reported* to its desired value: what a device does.

    Generated keys are drawn from "abcdef", so a `{"desired", "reported"}` node is always a leaf.
    """
    result = dict(reported)
    for key, node in difference.items():
        if set(node) == {"desired", "reported"}:
            result[key] = node["desired"]
        else:
            current = result.get(key)
            result[key] = apply_delta(current if isinstance(current, dict) else {}, node)
    return result


@SETTINGS
@given(documents(), documents())
def test_merge_never_mutates_its_inputs(document: dict[str, Any], patch: dict[str, Any]) -> None:
    before_document, before_patch = copy.deepcopy(document), copy.deepcopy(patch)
    merge(document, patch)
    assert same(document, before_document)
    assert same(patch, before_patch)


@SETTINGS
@given(documents())
def test_merging_an_empty_patch_is_the_identity(document: dict[str, Any]) -> None:
    assert same(merge(document, {}), document)


@SETTINGS
@given(documents(), documents())
def test_merge_result_holds_no_null_from_the_patch(
    document: dict[str, Any], patch: dict[str, Any]
) -> None:
    stored = without_nulls(document)
    merged = merge(stored, patch)
    assert same(merged, without_nulls(merged))
    for key, value in patch.items():
        if value is None:
            assert key not in merged
        elif not isinstance(value, dict):
            assert same(merged[key], value)


@SETTINGS
@given(documents(allow_null=False), documents(allow_null=False))
def test_applying_the_delta_brings_reported_in_sync(
    desired: dict[str, Any], reported: dict[str, Any]
) -> None:
    difference = delta(desired, reported)
    new_reported = apply_delta(reported, difference)
    assert delta(desired, new_reported) == {}


@SETTINGS
@given(documents(), documents())
def test_delta_keys_are_desired_keys(desired: dict[str, Any], reported: dict[str, Any]) -> None:
    assert set(delta(desired, reported)) <= set(desired)


@SETTINGS
@given(documents(allow_null=False))
def test_a_document_is_in_sync_with_itself(document: dict[str, Any]) -> None:
    assert delta(document, copy.deepcopy(document)) == {}


@SETTINGS
@given(json_values())
def test_validate_raises_only_shadow_errors(value: Any) -> None:
    small = Limits(max_bytes=200, max_depth=3, max_key_length=2)
    for limits in (Limits(), small):
        try:
            assert validate_patch(value, limits) is value
        except ShadowError as error:
            assert str(error), "a refusal must say why"
