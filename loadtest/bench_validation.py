"""Request validation, CPU only: the contract's msgspec checks against the hand-written checks
they replaced, for typical bodies and a typical query string.

Each variant starts from the raw bytes (or query pairs) and ends with checked values; the time
per call is the best of several repeats (`timeit`), so other load on the machine shows less.
`hand-written` is the code `gateway/endpoints/api.py` had before the contract (kept here as the
baseline; `+ names` adds the id and type patterns, which the contract checks at the edge and
the old code left to the store); `contract` is what the endpoints run now (orjson, then
`msgspec.convert`); `msgspec typed decode` parses and checks in one call, shown for reference
only: it reads integers beyond 64 bits as Python ints that orjson cannot store, so the gateway
does not use it.

    python -m loadtest.bench_validation --number 20000
"""

from __future__ import annotations

import argparse
import math
import re
import timeit
from collections.abc import Callable, Iterable
from typing import Any

import msgspec
import orjson

from gateway import contract, validation
from gateway.keys import is_device_id, is_device_type
from gateway.problems import Problem
from gateway.shadow import json_type

REGISTER = orjson.dumps(
    {
        "device_id": "thermo-0042",
        "device_type": "thermostat",
        "metadata": {"room": "lab-3", "floor": 2, "tags": ["east", "hvac"]},
    }
)
DESIRED = orjson.dumps(
    {"state": {"target": 21.5, "fan": {"mode": "auto", "speed": 2}}, "desired_version": 3}
)
QUERY = [("status", "online"), ("type", "thermostat"), ("limit", "500"), ("cursor", "eyJhIjoxfQ")]


# --- the hand-written checks the contract replaced (baseline) ----------------------
def _object(raw: bytes) -> dict[str, Any]:
    value = orjson.loads(raw)
    if not isinstance(value, dict):
        raise Problem("invalid-request", f"the body must be a JSON object, got {json_type(value)}")
    return value


def _only(body: dict[str, Any], names: tuple[str, ...]) -> None:
    for name in body:
        if name not in names:
            raise Problem("invalid-request", f"unknown field {name[:80]!r}", parameter=name)


def _string(body: dict[str, Any], name: str) -> str:
    value = body.get(name)
    if not isinstance(value, str):
        raise Problem("invalid-request", f"{name} must be a string", parameter=name)
    return value


def _document(body: dict[str, Any], name: str, required: bool) -> dict[str, Any]:
    if name not in body:
        if required:
            raise Problem("invalid-request", f"{name} is required", parameter=name)
        return {}
    value = body[name]
    if not isinstance(value, dict):
        raise Problem("invalid-state", f"{name} must be a JSON object", parameter=name)
    return value


def _version(body: dict[str, Any], name: str) -> int | None:
    value = body.get(name)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
        raise Problem("invalid-request", f"{name} must be an integer ≥ 0", parameter=name)
    return value


def old_register(raw: bytes) -> tuple[str, str, dict[str, Any]]:
    body = _object(raw)
    _only(body, ("device_id", "device_type", "metadata"))
    return (
        _string(body, "device_id"),
        _string(body, "device_type"),
        _document(body, "metadata", False),
    )


def old_register_named(raw: bytes) -> tuple[str, str, dict[str, Any]]:
    """The baseline plus the name checks the contract now makes at the edge (the store made
    them before, and still does)."""
    device_id, device_type, metadata = old_register(raw)
    if not is_device_id(device_id) or not is_device_type(device_type):
        raise Problem("invalid-device-id", "names")
    return device_id, device_type, metadata


def old_desired(raw: bytes) -> tuple[dict[str, Any], int | None, int | None]:
    body = _object(raw)
    _only(body, ("state", "version", "desired_version"))
    state = _document(body, "state", True)
    return state, _version(body, "version"), _version(body, "desired_version")


def old_query(pairs: Iterable[tuple[str, str]]) -> tuple[Any, ...]:
    names = ("status", "type", "stale_seconds", "include_state", "limit", "cursor")
    params: dict[str, str] = {}
    for name, value in pairs:
        if name not in names or name in params:
            raise Problem("invalid-request", f"bad query parameter {name!r}", parameter=name)
        params[name] = value
    status = params.get("status")
    if status is not None and status not in ("online", "offline"):
        raise Problem("invalid-request", "status", parameter="status")
    device_type = params.get("type")
    if device_type is not None and not is_device_type(device_type):
        raise Problem("invalid-request", "type", parameter="type")
    stale = params.get("stale_seconds")
    seconds = float(stale) if stale is not None else None
    if seconds is not None and (not math.isfinite(seconds) or seconds < 0):
        raise Problem("invalid-request", "stale_seconds", parameter="stale_seconds")
    include = params.get("include_state", "false").lower() in ("true", "1")
    limit_text = params.get("limit", "100")
    if not re.fullmatch(r"[0-9]{1,9}", limit_text) or not 1 <= int(limit_text) <= 1000:
        raise Problem("invalid-request", "limit", parameter="limit")
    cursor = params.get("cursor") or None
    if cursor is not None and len(cursor) > contract.MAX_CURSOR_LENGTH:
        raise Problem("invalid-cursor", "cursor")
    return status, device_type, seconds, include, int(limit_text), cursor


# --- the contract -----------------------------------------------------------------
def new_register(raw: bytes) -> contract.RegisterRequest:
    return validation.body(orjson.loads(raw), contract.RegisterRequest)


def new_desired(raw: bytes) -> contract.DesiredPatch:
    return validation.body(orjson.loads(raw), contract.DesiredPatch)


def new_query(pairs: Iterable[tuple[str, str]]) -> contract.DeviceQuery | None:
    return validation.query(pairs, contract.DeviceQuery)


def typed_register(raw: bytes) -> contract.RegisterRequest:
    return msgspec.json.decode(raw, type=contract.RegisterRequest)


def typed_desired(raw: bytes) -> contract.DesiredPatch:
    return msgspec.json.decode(raw, type=contract.DesiredPatch)


def best_ns(call: Callable[[], object], number: int, repeat: int) -> float:
    return min(timeit.repeat(call, number=number, repeat=repeat)) / number * 1e9


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m loadtest.bench_validation")
    parser.add_argument("--number", type=int, default=20_000, help="calls per repeat")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args(argv)
    cases: list[tuple[str, list[tuple[str, Callable[[], object]]]]] = [
        (
            "POST /api/devices body",
            [
                ("hand-written", lambda: old_register(REGISTER)),
                ("hand-written + names", lambda: old_register_named(REGISTER)),
                ("contract", lambda: new_register(REGISTER)),
                ("msgspec typed decode", lambda: typed_register(REGISTER)),
            ],
        ),
        (
            "PATCH .../desired body",
            [
                ("hand-written", lambda: old_desired(DESIRED)),
                ("contract", lambda: new_desired(DESIRED)),
                ("msgspec typed decode", lambda: typed_desired(DESIRED)),
            ],
        ),
        (
            "GET /api/devices query",
            [("hand-written", lambda: old_query(QUERY)), ("contract", lambda: new_query(QUERY))],
        ),
    ]
    for title, variants in cases:
        print(title)
        base = 0.0
        for name, call in variants:
            ns = best_ns(call, args.number, args.repeat)
            base = base or ns
            print(f"  {name:<22} {ns:8.0f} ns/call  ({ns / base:.2f}x)")


if __name__ == "__main__":
    main()
