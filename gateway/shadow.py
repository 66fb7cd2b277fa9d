"""Device shadow rules, pure: merge, delete-by-null, nested delta, timestamps and limits.

Semantics follow AWS IoT Device Shadow: a patch merges into a section (`desired` or
`reported`) recursively, `null` deletes a key, arrays and scalars replace whole, and the
delta keeps the path from the root to every differing leaf. Nothing here does I/O, so every
rule is tested without Redis.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import orjson

Document = dict[str, Any]
Precondition = Literal["version", "desired_version", "reported_version"]


class Versions(NamedTuple):
    """The shadow's versions: `version` moves with every desired or reported change, each
    section's own only with that section (Azure twins' `$version` per section)."""

    version: int = 0
    desired: int = 0
    reported: int = 0


class ShadowError(ValueError):
    """A patch or document breaks a shadow rule; `problem` names which (see problems.py)."""

    problem = "invalid-state"

    def __init__(self, detail: str, path: str = "") -> None:
        super().__init__(detail)
        self.detail = detail
        self.path = path


class NotAnObject(ShadowError):
    problem = "invalid-state"


class TooLarge(ShadowError):
    problem = "state-too-large"


class TooDeep(ShadowError):
    problem = "state-too-deep"


class BadKey(ShadowError):
    problem = "invalid-state-key"


class VersionConflict(ShadowError):
    """A write's precondition (*field*) names a version that is no longer current."""

    problem = "version-conflict"

    def __init__(
        self,
        expected: int,
        current: int,
        field: Precondition = "version",
        versions: Versions | None = None,
    ) -> None:
        what = "the shadow" if field == "version" else f"the {field.split('_')[0]} state"
        super().__init__(f"expected {field} {expected}, but {what} is at {field} {current}")
        self.expected = expected
        self.current = current
        self.field: Precondition = field
        if versions is None:
            versions = {
                "version": Versions(version=current),
                "desired_version": Versions(desired=current),
                "reported_version": Versions(reported=current),
            }[field]
        self.versions = versions


@dataclass(frozen=True, slots=True)
class Limits:
    max_bytes: int = 32768
    max_depth: int = 8
    max_key_length: int = 128


def validate_patch(patch: object, limits: Limits) -> Document:
    """Return *patch* as a document, or raise the ShadowError that says what is wrong."""
    if not isinstance(patch, dict):
        raise NotAnObject(f"state must be a JSON object, got {json_type(patch)}")
    _check_tree(patch, limits, depth=1, path="")
    check_size(patch, limits)
    return patch


def check_size(document: Document, limits: Limits) -> bytes:
    """The encoded document, once it is known to fit the section limit."""
    try:
        encoded = encode(document)
    except orjson.JSONEncodeError as exc:  # e.g. an integer beyond 64 bits
        raise ShadowError(f"state holds a value JSON cannot encode: {exc}") from None
    if len(encoded) > limits.max_bytes:
        raise TooLarge(
            f"state section is {len(encoded)} bytes encoded; the limit is {limits.max_bytes}"
        )
    return encoded


def _check_tree(node: Document, limits: Limits, depth: int, path: str) -> None:
    if depth > limits.max_depth:
        raise TooDeep(f"state nests deeper than {limits.max_depth} levels at '{path}'", path)
    for key, value in node.items():
        child = f"{path}.{key}" if path else key
        if not key or len(key) > limits.max_key_length:
            raise BadKey(
                f"keys must be 1–{limits.max_key_length} characters; '{child[:160]}' is not",
                child,
            )
        if isinstance(value, dict):
            _check_tree(value, limits, depth + 1, child)
        elif isinstance(value, list):
            _check_list(value, limits, depth + 1, child)


def _check_list(items: list[Any], limits: Limits, depth: int, path: str) -> None:
    if depth > limits.max_depth:
        raise TooDeep(f"state nests deeper than {limits.max_depth} levels at '{path}'", path)
    for index, value in enumerate(items):
        if isinstance(value, dict):
            _check_tree(value, limits, depth + 1, f"{path}[{index}]")
        elif isinstance(value, list):
            _check_list(value, limits, depth + 1, f"{path}[{index}]")


def merge(document: Document, patch: Document) -> Document:
    """*document* with *patch* applied; neither argument is changed.

    Objects merge key by key, `None` deletes, anything else (arrays included) replaces.
    """
    result = dict(document)
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        elif isinstance(value, dict):
            current = result.get(key)
            result[key] = merge(current if isinstance(current, dict) else {}, value)
        else:
            result[key] = value
    return result


def stamp(document: Document, now: float) -> Document:
    """Per-leaf timestamps for a document written whole at *now* (to the millisecond)."""
    now = round(now, 3)
    return {
        key: stamp(value, now) if isinstance(value, dict) else {"timestamp": now}
        for key, value in document.items()
        if value is not None
    }


def merge_stamps(stamps: Document, patch: Document, now: float) -> Document:
    """Timestamps after *patch* merged at *now*: touched leaves get *now* (to the
    millisecond), deleted ones go."""
    now = round(now, 3)
    result = dict(stamps)
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        elif isinstance(value, dict):
            current = result.get(key)
            nested = current if isinstance(current, dict) and not _is_stamp(current) else {}
            result[key] = merge_stamps(nested, value, now)
        else:
            result[key] = {"timestamp": now}
    return result


def encode_stamps(stamps: Document) -> bytes:
    """Stamps as stored: when every leaf was written at one time (a section written whole, the
    common case) just that time, to the millisecond; else the document. A compact value keeps
    the device hash within Redis's compact encoding (values of at most 64 bytes)."""
    times = set(_stamp_times(stamps))
    if len(times) == 1:
        return orjson.dumps(round(times.pop(), 3))
    return orjson.dumps(stamps)


def decode_stamps(raw: bytes | str | None, section: Document) -> Document:
    """Stored stamps as a document: a single time stamps every leaf of *section*."""
    value = _loaded(raw)
    if isinstance(value, int | float) and not isinstance(value, bool):
        return stamp(section, value)
    return value if isinstance(value, dict) else {}


def _stamp_times(stamps: Document) -> Iterator[float]:
    for node in stamps.values():
        if isinstance(node, dict) and _is_stamp(node):
            yield node["timestamp"]
        elif isinstance(node, dict):
            yield from _stamp_times(node)


def _is_stamp(node: Document) -> bool:
    return len(node) == 1 and isinstance(node.get("timestamp"), int | float)


def delta(desired: Document, reported: Document) -> Document:
    """Every desired leaf that reported does not match, with its path kept to the root.

    A differing leaf becomes `{"desired": d, "reported": r}` (`r` is `None` when absent);
    nested objects are compared key by key; keys only in reported are not part of the delta.
    """
    result: Document = {}
    for key, wanted in desired.items():
        actual = reported.get(key)
        if isinstance(wanted, dict):
            nested = delta(wanted, actual if isinstance(actual, dict) else {})
            if nested:
                result[key] = nested
            elif wanted == {} and not isinstance(actual, dict) and actual is not None:
                result[key] = {"desired": {}, "reported": actual}
        elif not same(wanted, actual):
            result[key] = {"desired": wanted, "reported": actual}
    return result


def same(left: Any, right: Any) -> bool:
    """JSON equality: `true` is not `1`, `1` is `1.0`, containers compare deeply."""
    if isinstance(left, bool) or isinstance(right, bool):
        return type(left) is type(right) and left == right
    if isinstance(left, dict) and isinstance(right, dict):
        return left.keys() == right.keys() and all(same(v, right[k]) for k, v in left.items())
    if isinstance(left, list) and isinstance(right, list):
        return len(left) == len(right) and all(same(a, b) for a, b in zip(left, right, strict=True))
    if isinstance(left, int | float) and isinstance(right, int | float):
        return left == right
    return type(left) is type(right) and bool(left == right)


def check_version(expected: int | None, current: int, field: Precondition = "version") -> None:
    """Refuse a write made against a version that is no longer current."""
    if expected is not None and expected != current:
        raise VersionConflict(expected, current, field)


def section_hash(raw: bytes | str | None) -> str:
    """The SHA-1 (hex) of a stored section, as Redis' `redis.sha1hex` computes it."""
    data = raw.encode() if isinstance(raw, str) else raw or b""
    return hashlib.sha1(data).hexdigest()


def written_elsewhere(raw: bytes | str | None, known_hash: str | None, stamped: bool) -> bool:
    """Whether a section was last written by another program than the gateway.

    *known_hash* is the hash of what the gateway last wrote there. Without one, a section the
    gateway stamped (*stamped*: it has per-leaf timestamps) is taken as the gateway's own, and
    an unstamped one (a device registered by other programs) counts as written elsewhere once
    it holds anything.
    """
    if known_hash is not None:
        # stored as the hash's first 16 hex digits (whole, before: still read)
        return len(known_hash) < 16 or not section_hash(raw).startswith(known_hash)
    return not stamped and bool(decode_document(raw))


def encode(document: Any) -> bytes:
    return orjson.dumps(document)


def decode_document(raw: bytes | str | None) -> Document:
    """A stored section as a document; anything unreadable counts as empty, never a crash."""
    value = _loaded(raw)
    return value if isinstance(value, dict) else {}


def _loaded(raw: bytes | str | None) -> Any:
    """A stored JSON value, or None when there is none or it cannot be read."""
    if not raw:
        return None
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None


def json_type(value: object) -> str:
    """The JSON name of a value's type, for error messages that say what arrived."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object" if isinstance(value, dict) else type(value).__name__
