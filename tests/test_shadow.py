"""The pure shadow rules: merge, delete-by-null, nested delta, stamps, limits and versions.

These are the AWS IoT Device Shadow semantics the contract promises (§4); each case pins one
rule so a regression names itself.
"""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from gateway import shadow
from gateway.shadow import (
    BadKey,
    Limits,
    NotAnObject,
    ShadowError,
    TooDeep,
    TooLarge,
    VersionConflict,
    check_version,
    decode_document,
    decode_stamps,
    delta,
    encode_stamps,
    merge,
    merge_stamps,
    same,
    section_hash,
    stamp,
    validate_patch,
    written_elsewhere,
)

LIMITS = Limits()


def nested(depth: int) -> dict[str, Any]:
    """An object *depth* levels deep (the outermost object is level 1)."""
    document: dict[str, Any] = {"leaf": 1}
    for _ in range(depth - 1):
        document = {"n": document}
    return document


# --- merge -------------------------------------------------------------------
def test_merge_adds_and_replaces_top_level_keys() -> None:
    assert merge({"a": 1, "b": 2}, {"b": 3, "c": 4}) == {"a": 1, "b": 3, "c": 4}


def test_merge_null_deletes_a_key_and_ignores_missing_ones() -> None:
    assert merge({"a": 1, "b": 2}, {"a": None, "zz": None}) == {"b": 2}


def test_merge_nested_objects_merge_key_by_key() -> None:
    document = {"light": {"on": True, "level": 5}, "fan": 1}
    assert merge(document, {"light": {"level": 7}}) == {
        "light": {"on": True, "level": 7},
        "fan": 1,
    }


def test_merge_nested_null_deletes_only_that_leaf() -> None:
    document = {"light": {"on": True, "level": 5}}
    assert merge(document, {"light": {"on": None}}) == {"light": {"level": 5}}


def test_merge_arrays_replace_whole() -> None:
    assert merge({"list": [1, 2, 3]}, {"list": [9]}) == {"list": [9]}
    assert merge({"list": [{"a": 1}]}, {"list": [{"b": 2}]}) == {"list": [{"b": 2}]}


def test_merge_object_replaces_scalar_and_scalar_replaces_object() -> None:
    assert merge({"a": 5}, {"a": {"x": 1}}) == {"a": {"x": 1}}
    assert merge({"a": {"x": 1}}, {"a": 5}) == {"a": 5}


def test_merge_null_inside_new_object_is_not_stored() -> None:
    assert merge({}, {"a": {"x": None, "y": 1}}) == {"a": {"y": 1}}


def test_merge_does_not_change_its_arguments() -> None:
    document = {"a": {"b": 1}}
    patch = {"a": {"c": 2}, "d": None}
    merge(document, patch)
    assert document == {"a": {"b": 1}}
    assert patch == {"a": {"c": 2}, "d": None}


# --- delta -------------------------------------------------------------------
def test_delta_is_empty_when_in_sync_and_ignores_reported_only_keys() -> None:
    assert delta({"a": 1}, {"a": 1, "extra": 2}) == {}


def test_delta_reports_missing_and_different_leaves() -> None:
    assert delta({"a": 1, "b": 2}, {"a": 3}) == {
        "a": {"desired": 1, "reported": 3},
        "b": {"desired": 2, "reported": None},
    }


def test_delta_keeps_the_path_to_the_root_for_nested_leaves() -> None:
    desired = {"light": {"color": {"r": 255, "g": 0}, "on": True}}
    reported = {"light": {"color": {"r": 255, "g": 10}, "on": True}}
    assert delta(desired, reported) == {"light": {"color": {"g": {"desired": 0, "reported": 10}}}}


def test_delta_nested_against_scalar_reports_every_desired_leaf() -> None:
    assert delta({"a": {"b": 1}}, {"a": 7}) == {"a": {"b": {"desired": 1, "reported": None}}}


def test_delta_true_is_not_one_and_false_is_not_zero() -> None:
    assert delta({"on": True}, {"on": 1}) == {"on": {"desired": True, "reported": 1}}
    assert delta({"on": 0}, {"on": False}) == {"on": {"desired": 0, "reported": False}}


def test_delta_one_is_one_point_zero() -> None:
    assert delta({"level": 1}, {"level": 1.0}) == {}


def test_delta_arrays_compare_whole_and_strictly() -> None:
    assert delta({"l": [1, 2]}, {"l": [1, 2]}) == {}
    assert delta({"l": [True]}, {"l": [1]}) == {"l": {"desired": [True], "reported": [1]}}
    assert delta({"l": [1, 2]}, {"l": [1]}) == {"l": {"desired": [1, 2], "reported": [1]}}


def test_delta_empty_desired_object_against_scalar_differs() -> None:
    assert delta({"a": {}}, {"a": 3}) == {"a": {"desired": {}, "reported": 3}}
    assert delta({"a": {}}, {"a": {"x": 1}}) == {}


def test_delta_desired_null_leaf_against_absent_is_in_sync() -> None:
    assert delta({"a": None}, {}) == {}


def test_same_follows_json_equality() -> None:
    assert not same(True, 1)
    assert not same(1, True)
    assert same(1, 1.0)
    assert same({"a": [1, {"b": False}]}, {"a": [1.0, {"b": False}]})
    assert not same({"a": [1, {"b": False}]}, {"a": [1, {"b": 0}]})
    assert not same("1", 1)
    assert not same(None, 0)
    assert same(None, None)
    assert not same({"a": 1}, {"a": 1, "b": 2})


# --- stamps ------------------------------------------------------------------
def test_stamp_gives_every_leaf_a_timestamp_and_skips_nulls() -> None:
    assert stamp({"a": 1, "b": {"c": [1, 2]}, "d": None}, 10.0) == {
        "a": {"timestamp": 10.0},
        "b": {"c": {"timestamp": 10.0}},
    }


def test_merge_stamps_touches_only_patched_leaves() -> None:
    stamps = stamp({"a": 1, "b": {"c": 2, "d": 3}}, 1.0)
    after = merge_stamps(stamps, {"b": {"c": 5}}, 2.0)
    assert after == {
        "a": {"timestamp": 1.0},
        "b": {"c": {"timestamp": 2.0}, "d": {"timestamp": 1.0}},
    }
    assert stamps["b"]["c"] == {"timestamp": 1.0}, "merge_stamps changed its input"


def test_merge_stamps_deletes_with_null_and_replaces_leaf_with_object() -> None:
    stamps = stamp({"a": 1, "b": 2}, 1.0)
    after = merge_stamps(stamps, {"a": None, "b": {"x": 1}}, 3.0)
    assert after == {"b": {"x": {"timestamp": 3.0}}}


def test_stamps_of_a_section_written_at_once_are_stored_as_one_time() -> None:
    section = {"temp": 21.5, "hum": 40, "fw": {"version": "1.4.2"}}
    stamps = stamp(section, 1764325000.1234567)
    stored = encode_stamps(stamps)
    assert stored == b"1764325000.123"  # one number, not a document per leaf
    assert decode_stamps(stored, section) == stamp(section, 1764325000.123)


def test_stamps_written_at_several_times_are_stored_whole() -> None:
    section = {"a": 1, "b": {"c": 2}}
    stamps = merge_stamps(stamp(section, 1.0), {"b": {"c": 3}}, 2.0004)
    stored = encode_stamps(stamps)
    assert orjson.loads(stored) == {"a": {"timestamp": 1.0}, "b": {"c": {"timestamp": 2.0}}}
    assert decode_stamps(stored, section) == orjson.loads(stored)


@pytest.mark.parametrize("raw", [None, b"", b"not json", b"[1]", b"true"])
def test_unreadable_stamps_read_as_none(raw: bytes | None) -> None:
    assert decode_stamps(raw, {"a": 1}) == {}
    assert encode_stamps({}) == b"{}"


# --- limits ------------------------------------------------------------------
@pytest.mark.parametrize(
    ("value", "kind"),
    [([1], "array"), ("x", "string"), (1, "number"), (None, "null"), (True, "boolean")],
)
def test_validate_refuses_non_objects(value: object, kind: str) -> None:
    with pytest.raises(NotAnObject, match=f"must be a JSON object, got {kind}") as caught:
        validate_patch(value, LIMITS)
    assert caught.value.problem == "invalid-state"


def test_validate_accepts_a_document_at_each_limit() -> None:
    assert validate_patch(nested(LIMITS.max_depth), LIMITS) == nested(LIMITS.max_depth)
    assert validate_patch({"k" * LIMITS.max_key_length: 1}, LIMITS)
    filler = "x" * (LIMITS.max_bytes - len('{"a":""}'))
    assert len(shadow.encode({"a": filler})) == LIMITS.max_bytes
    assert validate_patch({"a": filler}, LIMITS)


def test_validate_refuses_one_level_too_deep() -> None:
    with pytest.raises(TooDeep, match="deeper than 8 levels") as caught:
        validate_patch(nested(LIMITS.max_depth + 1), LIMITS)
    assert caught.value.problem == "state-too-deep"
    assert caught.value.path.startswith("n.n.")


def test_validate_counts_arrays_as_levels() -> None:
    document: Any = [1]
    for _ in range(LIMITS.max_depth - 1):
        document = [document]
    with pytest.raises(TooDeep):
        validate_patch({"a": document}, LIMITS)
    assert validate_patch({"a": document[0]}, LIMITS)


def test_validate_refuses_one_byte_too_large() -> None:
    filler = "x" * (LIMITS.max_bytes - len('{"a":""}') + 1)
    with pytest.raises(TooLarge, match=f"{LIMITS.max_bytes + 1} bytes.*limit is 32768") as caught:
        validate_patch({"a": filler}, LIMITS)
    assert caught.value.problem == "state-too-large"


@pytest.mark.parametrize("key", ["", "k" * 129])
def test_validate_refuses_bad_keys_anywhere(key: str) -> None:
    with pytest.raises(BadKey, match="keys must be 1–128 characters") as caught:
        validate_patch({"ok": {"inner": {key: 1}}}, LIMITS)
    assert caught.value.problem == "invalid-state-key"
    assert caught.value.path.startswith("ok.inner.")


def test_validate_refuses_bad_keys_inside_arrays() -> None:
    with pytest.raises(BadKey):
        validate_patch({"list": [{"": 1}]}, LIMITS)


def test_limits_are_configurable() -> None:
    small = Limits(max_bytes=20, max_depth=2, max_key_length=3)
    with pytest.raises(BadKey, match="1–3 characters"):
        validate_patch({"abcd": 1}, small)
    with pytest.raises(TooDeep, match="deeper than 2"):
        validate_patch({"a": {"b": {"c": 1}}}, small)
    with pytest.raises(TooLarge, match="limit is 20"):
        validate_patch({"a": "x" * 30}, small)


def test_validate_refuses_integers_json_cannot_encode_with_a_shadow_error() -> None:
    """A number beyond 64 bits must be a client error (422), not an escaping TypeError (500)."""
    with pytest.raises(ShadowError):
        validate_patch({"a": 2**70}, LIMITS)


def test_every_shadow_error_is_a_value_error_with_a_problem_kind() -> None:
    for cls in (NotAnObject, TooLarge, TooDeep, BadKey):
        error = cls("detail")
        assert isinstance(error, ShadowError)
        assert isinstance(error, ValueError)
        assert error.detail == "detail"
    assert VersionConflict(1, 2).problem == "version-conflict"


# --- versions ----------------------------------------------------------------
def test_check_version_accepts_none_and_the_current_version() -> None:
    check_version(None, 7)
    check_version(7, 7)


def test_check_version_refuses_a_stale_version() -> None:
    with pytest.raises(
        VersionConflict, match=r"^expected version 3, but the shadow is at version 5$"
    ):
        check_version(3, 5)
    try:
        check_version(6, 5)
    except VersionConflict as conflict:
        assert (conflict.expected, conflict.current) == (6, 5)
    else:  # pragma: no cover - the assertion above is the test
        raise AssertionError("no conflict raised")


def test_a_section_conflict_names_its_section_once() -> None:
    with pytest.raises(VersionConflict) as caught:
        check_version(1, 4, "desired_version")
    assert caught.value.detail == (
        "expected desired_version 1, but the desired state is at desired_version 4"
    )
    assert caught.value.versions == (0, 4, 0)


# --- writes by other programs ---------------------------------------------------
def test_section_hash_is_redis_sha1hex() -> None:
    assert section_hash(b"{}") == "bf21a9e8fbc5a3846fb05b4fa0859e0917b2202f"
    assert section_hash("{}") == section_hash(b"{}") and section_hash(None) == section_hash(b"")


def test_a_section_is_written_elsewhere_when_it_no_longer_hashes_as_written() -> None:
    ours = b'{"a":1}'
    assert not written_elsewhere(ours, section_hash(ours), stamped=True)
    assert written_elsewhere(b'{"a": 1}', section_hash(ours), stamped=True)
    # no hash kept yet: a stamped section is the gateway's, an unstamped one counts once it
    # holds anything (registered by another program, then written by it)
    assert not written_elsewhere(b'{"a": 1}', None, stamped=True)
    assert not written_elsewhere(b"{}", None, stamped=False)
    assert written_elsewhere(b'{"a": 1}', None, stamped=False)


# --- decoding ----------------------------------------------------------------
@pytest.mark.parametrize("raw", [None, b"", b"not json", b"[1]", b"3", "null"])
def test_decode_document_treats_unreadable_as_empty(raw: bytes | str | None) -> None:
    assert decode_document(raw) == {}


def test_decode_document_reads_the_seeds_encoding() -> None:
    assert decode_document(b'{"a": 1, "b": {"c": true}}') == {"a": 1, "b": {"c": True}}
