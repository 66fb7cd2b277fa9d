"""Requests checked against the contract's declarations, and refusals explained in their words.

One `msgspec.convert` call checks a request. Only a refused one is walked field by field (off
the fast path) to find the first field at fault and say what its declaration expected: the
field, its limit and what arrived. Pure: no I/O, no HTTP beyond the problem it raises.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import msgspec
from msgspec import inspect as mi

from gateway.problems import Problem
from gateway.shadow import json_type

S = TypeVar("S", bound=msgspec.Struct)
INVALID = "invalid-request"


def body(value: object, spec: type[S]) -> S:
    """Parsed JSON as *spec* (types exact: "5" is no number), or the problem at fault."""
    if not isinstance(value, dict):
        raise _invalid("body", f"the body must be a JSON object, got {json_type(value)}")
    try:
        return msgspec.convert(value, spec)
    except msgspec.ValidationError as error:
        raise _explain(value, spec, "field", error, text=False) from None


def query(pairs: Iterable[tuple[str, str]], spec: type[S] | None) -> S | None:
    """A query string as *spec*, texts converted ("5" to 5); with no *spec*, none is accepted."""
    given: dict[str, str] = {}
    for name, text in pairs:
        if name in given:
            raise _invalid(name, f"query parameter {name[:80]!r} is given more than once")
        given[name] = text
    if spec is None:
        for name in given:
            raise _unknown(name, (), "query parameter")
        return None
    try:
        return msgspec.convert(given, spec, strict=False)
    except msgspec.ValidationError as error:
        raise _explain(given, spec, "query parameter", error, text=True) from None


def path(name: str, text: str, annotation: Any) -> Any:
    """A path parameter as its declared type."""
    try:
        return msgspec.convert(text, annotation, strict=False)
    except msgspec.ValidationError:
        raise refusal(name, text, annotation, text=True) from None


def problems(spec: type[msgspec.Struct] | None) -> set[str]:
    """Every problem kind checking *spec* (or the annotations of a path) can give."""
    if spec is None:
        return {INVALID}
    return {INVALID} | {
        kind for f in msgspec.structs.fields(spec) for kind in Declared.of(f.type).problems()
    }


@dataclass(frozen=True)
class Declared:
    """An annotation reduced to its one wire type and the `extra` of its metadata."""

    info: mi.Type
    extra: Mapping[str, Any]

    @classmethod
    def of(cls, annotation: Any) -> Declared:
        return cls._unwrap(mi.type_info(annotation), {})

    @classmethod
    def _unwrap(cls, info: mi.Type, outer: Mapping[str, Any]) -> Declared:
        if isinstance(info, mi.Metadata):
            return cls._unwrap(info.type, {**(info.extra or {}), **outer})
        if isinstance(info, mi.UnionType):  # `X | None`: what matters is X
            members = [t for t in info.types if not isinstance(t, mi.NoneType)]
            if len(members) == 1:
                return cls._unwrap(members[0], outer)
        return cls(info, outer)

    def problems(self) -> set[str]:
        extra = self.extra
        kinds = {extra.get("problem", INVALID), extra.get("type_problem", INVALID)}
        return kinds | set(extra.get("also", ()))

    @property
    def expected(self) -> str:
        """What a value must be, in words."""
        info = self.info
        if "expected" in self.extra:
            return str(self.extra["expected"])
        if isinstance(info, mi.IntType):
            return "an integer" + _bounds(info)
        if isinstance(info, mi.FloatType):
            return "a number" + _bounds(info)
        if isinstance(info, mi.BoolType):
            return "true or false"
        if isinstance(info, mi.LiteralType):
            return "one of " + "|".join(str(value) for value in info.values)
        if isinstance(info, mi.StrType) and info.max_length is not None:
            return f"a string of at most {info.max_length} characters"
        if isinstance(info, mi.StrType):
            return "a string"
        return "a JSON object" if isinstance(info, mi.DictType) else "valid"

    def fits(self, value: object) -> bool:
        """Whether *value* has the declared JSON type (it may still break a limit)."""
        info = self.info
        if isinstance(value, bool) or isinstance(info, mi.BoolType):
            return isinstance(value, bool) and isinstance(info, mi.BoolType)
        if isinstance(info, mi.IntType):
            return isinstance(value, int)
        if isinstance(info, mi.FloatType):
            return isinstance(value, int | float)
        if isinstance(info, mi.StrType | mi.LiteralType):
            return isinstance(value, str)
        return isinstance(value, dict) if isinstance(info, mi.DictType) else True


def refusal(name: str, value: object, annotation: Any, text: bool) -> Problem:
    """The problem for *value* of *name*, which its declaration refused.

    A value of the right JSON type (every text, for query and path parameters) broke a limit:
    the declaration's `problem`; one of another type is its `type_problem`.
    """
    declared = Declared.of(annotation)
    fits = text or declared.fits(value)
    kind = declared.extra.get("problem" if fits else "type_problem", INVALID)
    got = _shown(value) if fits else json_type(value)
    return Problem(kind, f"{name} must be {declared.expected}, got {got}", parameter=name)


def _explain(
    given: Mapping[str, Any],
    spec: type[msgspec.Struct],
    noun: str,
    error: msgspec.ValidationError,
    text: bool,
) -> Problem:
    """The first field at fault: unknown, then missing or refused in declared order."""
    fields = msgspec.structs.fields(spec)
    names = tuple(f.encode_name for f in fields)
    for name in given:
        if name not in names:
            return _unknown(name, names, noun)
    for f in fields:
        name = f.encode_name
        if name not in given:
            if f.required:
                return _invalid(name, f"{name} is required: {Declared.of(f.type).expected}")
            continue
        try:
            msgspec.convert(given[name], f.type, strict=not text)
        except msgspec.ValidationError:
            return refusal(name, given[name], f.type, text)
    return Problem(INVALID, f"the request is not valid: {error}")  # pragma: no cover


def _bounds(info: mi.IntType | mi.FloatType) -> str:
    if info.ge is not None and info.le is not None:
        return f" {info.ge}–{info.le}"
    limits = [
        f"{sign} {bound}"
        for sign, bound in (("≥", info.ge), (">", info.gt), ("≤", info.le), ("<", info.lt))
        if bound is not None
    ]
    return " " + " and ".join(limits) if limits else ""


def _shown(value: object) -> str:
    if isinstance(value, str):
        return repr(value[:80])
    return repr(value) if isinstance(value, int | float) else json_type(value)


def _unknown(name: str, names: tuple[str, ...], noun: str) -> Problem:
    expected = ", ".join(names) if names else "none"
    return _invalid(name, f"unknown {noun} {name[:80]!r}; expected {expected}")


def _invalid(parameter: str, detail: str) -> Problem:
    return Problem(INVALID, detail, parameter=parameter)
