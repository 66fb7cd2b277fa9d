"""The REST API's OpenAPI 3.1 document, built from the same limits and problem table the code uses.

Precise enough for a schema-driven fuzzer (schemathesis) to check every response, problem
responses included, so the document cannot silently drift from what the endpoints send.
"""

from __future__ import annotations

import copy
import functools
from typing import Any

from gateway.problems import KINDS, TYPE_BASE
from gateway.store import MAX_PAGE

Schema = dict[str, Any]

ID_PATTERN = "^[A-Za-z0-9._-]{1,128}$"
TYPE_PATTERN = "^[A-Za-z0-9._-]{1,64}$"
STREAM_ID_PATTERN = "^[0-9]{1,20}(-[0-9]{1,20})?$"
MAX_HISTORY_PAGE = 500
PROBLEM_MEDIA_TYPE = "application/problem+json"


def _ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def _object(properties: Schema, required: list[str] | None = None, extra: bool = False) -> Schema:
    return {
        "type": "object",
        "properties": properties,
        "required": required if required is not None else list(properties),
        "additionalProperties": extra,
    }


def _problem(*kinds: str) -> Schema:
    """A problem+json response that may carry any of *kinds* (all share one status)."""
    statuses = {KINDS[kind].status for kind in kinds}
    assert len(statuses) == 1, kinds
    titles = "; ".join(f"`{kind}`: {KINDS[kind].title}" for kind in kinds)
    schema: Schema = {
        "allOf": [
            _ref("Problem"),
            {"properties": {"type": {"enum": [TYPE_BASE + kind for kind in kinds]}}},
        ]
    }
    response: Schema = {
        "description": titles,
        "content": {PROBLEM_MEDIA_TYPE: {"schema": schema}},
    }
    if "unauthorized" in kinds:
        response["headers"] = {
            "WWW-Authenticate": {
                "description": 'Always `Bearer realm="presence-gateway"`, with '
                '`error="invalid_token"` when a key was presented but is unknown',
                "schema": {"type": "string"},
                "required": True,
            }
        }
    if "method-not-allowed" in kinds:
        response["headers"] = {
            "Allow": {"description": "The methods this path accepts", "schema": {"type": "string"}}
        }
    return response


def _json(description: str, schema: Schema, headers: Schema | None = None) -> Schema:
    response: Schema = {
        "description": description,
        "content": {"application/json": {"schema": schema}},
    }
    if headers:
        response["headers"] = headers
    return response


# Responses every authenticated API operation can give.
_COMMON: dict[str, Schema] = {
    "401": _problem("unauthorized"),
    "500": _problem("internal-error"),
    "503": _problem("redis-unavailable", "write-contention"),
}
_QUERY_422 = ("invalid-request",)
_BODY_ERRORS: dict[str, Schema] = {
    "400": _problem("invalid-json"),
    "413": _problem("body-too-large", "state-too-large"),
    "415": _problem("unsupported-media-type"),
}


def _operation(
    operation_id: str,
    summary: str,
    responses: dict[str, Schema],
    *,
    write: bool,
    parameters: list[Schema] | None = None,
    body: Schema | None = None,
    description: str = "",
    tag: str = "devices",
) -> Schema:
    merged = dict(_COMMON)
    if write:
        merged["403"] = _problem("forbidden")
    merged.update(responses)
    operation: Schema = {
        "operationId": operation_id,
        "summary": summary,
        "tags": [tag],
        "parameters": parameters or [],
        "responses": dict(sorted(merged.items())),
    }
    if description:
        operation["description"] = description
    if body is not None:
        operation["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": body}},
        }
    return operation


def _query(name: str, schema: Schema, description: str) -> Schema:
    return {
        "name": name,
        "in": "query",
        "required": False,
        "schema": schema,
        "description": description,
    }


_DEVICE_ID: Schema = {"$ref": "#/components/parameters/DeviceId"}
_LIMIT_DEVICES = _query(
    "limit",
    {"type": "integer", "minimum": 1, "maximum": MAX_PAGE, "default": 100},
    "Largest number of items on the page",
)


def _schemas() -> dict[str, Schema]:
    document: Schema = {
        "type": "object",
        "description": "A JSON object (a state section or metadata)",
        "additionalProperties": True,
    }
    number = {"type": "number"}
    summary = {
        "device_id": {"type": "string", "pattern": ID_PATTERN},
        "device_type": {"type": "string", "pattern": TYPE_PATTERN},
        "status": {"type": "string", "enum": ["online", "offline"]},
        "last_seen": {**number, "description": "Epoch seconds; 0 when never seen"},
        "version": {
            "type": "integer",
            "minimum": 0,
            "description": "Shadow version: moves with every desired or reported change",
        },
    }
    device = {
        **summary,
        "desired_version": {
            "type": "integer",
            "minimum": 0,
            "description": "Moves with every desired change only",
        },
        "reported_version": {
            "type": "integer",
            "minimum": 0,
            "description": "Moves with every reported change only",
        },
        "registered_at": {**number, "description": "Epoch seconds"},
        "presence_version": {"type": "integer", "minimum": 0},
        "metadata": _ref("Document"),
        "reported_state": _ref("Document"),
        "desired_state": _ref("Document"),
        "delta": _ref("Delta"),
        "shadow_metadata": _object({"desired": _ref("Document"), "reported": _ref("Document")}),
    }
    event_common = {
        "id": {"type": "string", "pattern": STREAM_ID_PATTERN, "description": "Stream id"},
        "device_id": {"type": "string", "pattern": ID_PATTERN},
        "timestamp": number,
    }
    presence_event = _object(
        {
            **event_common,
            "type": {"const": "presence"},
            "status": {"type": "string", "enum": ["online", "offline"]},
            "version": {
                "type": "integer",
                "minimum": 1,
                "description": "Per-device presence version; only increases",
            },
            "reason": {
                "type": "string",
                "description": "connected, closed, connection_lost, expired, replaced, …",
            },
        },
        required=["id", "type", "device_id", "status", "timestamp"],
        extra=True,
    )
    state_event = _object(
        {
            **event_common,
            "type": {"const": "state"},
            "section": {"type": "string", "enum": ["desired", "reported"]},
            "version": {"type": "integer", "minimum": 1},
            "state": _ref("Document"),
            "external": {
                "type": "boolean",
                "description": "True when another program wrote the section straight to Redis",
            },
        },
        required=["id", "type", "device_id", "section", "version", "timestamp", "state"],
        extra=True,
    )
    metadata_event = _object(
        {**event_common, "type": {"const": "metadata"}, "metadata": _ref("Document")},
        required=["id", "type", "device_id", "timestamp", "metadata"],
        extra=True,
    )
    counts = _object(
        {name: {"type": "integer", "minimum": 0} for name in ("registered", "online", "offline")}
    )
    return {
        "Document": document,
        "Delta": {
            "type": "object",
            "description": "Every desired leaf that reported does not match, keyed by its path "
            "from the root: a leaf is `{desired, reported}` (reported null when absent), an "
            "inner node is another Delta.",
            "additionalProperties": {"type": "object"},
        },
        "Problem": {
            "type": "object",
            "description": "RFC 9457 problem details",
            "properties": {
                "type": {"type": "string", "format": "uri"},
                "title": {"type": "string"},
                "status": {"type": "integer", "minimum": 400, "maximum": 599},
                "detail": {"type": "string"},
                "instance": {"type": "string"},
                "parameter": {
                    "type": "string",
                    "description": "The field or query parameter at fault",
                },
                "path": {"type": "string", "description": "The state key at fault"},
                "expected_version": {"type": "integer", "minimum": 0},
                "expected_desired_version": {"type": "integer", "minimum": 0},
                "current_version": {"type": "integer", "minimum": 0},
                "current_desired_version": {"type": "integer", "minimum": 0},
                "current_reported_version": {"type": "integer", "minimum": 0},
            },
            "required": ["type", "title", "status", "detail"],
            "additionalProperties": True,
        },
        "DeviceSummary": _object(summary),
        "DeviceWithState": _object(
            {
                **summary,
                "metadata": _ref("Document"),
                "reported_state": _ref("Document"),
                "desired_state": _ref("Document"),
            }
        ),
        "Device": _object(device),
        "RegisteredDevice": _object(
            {
                **device,
                "token": {
                    "type": "string",
                    "minLength": 1,
                    "description": "The device token; shown only here",
                },
            }
        ),
        "RegisterRequest": _object(
            {
                "device_id": {"type": "string", "pattern": ID_PATTERN},
                "device_type": {"type": "string", "pattern": TYPE_PATTERN},
                "metadata": _ref("Document"),
            },
            required=["device_id", "device_type"],
        ),
        "MetadataPatch": _object(
            {"metadata": {**document, "description": "Merged into metadata; null deletes"}}
        ),
        "DesiredPatch": _object(
            {
                "state": {
                    **document,
                    "description": "Merged into the desired state; null "
                    "deletes a key, nested objects merge, arrays replace",
                },
                "version": {
                    "type": "integer",
                    "minimum": 0,
                    "description": "Write only if the shadow (desired and reported) is still "
                    "at this version",
                },
                "desired_version": {
                    "type": "integer",
                    "minimum": 0,
                    "description": "Write only if the desired state is still at this version; "
                    "the device's own reports never make it stale",
                },
            },
            required=["state"],
        ),
        "DesiredResult": _object(
            {
                "device_id": {"type": "string", "pattern": ID_PATTERN},
                "version": {"type": "integer", "minimum": 0},
                "desired_version": {"type": "integer", "minimum": 0},
                "reported_version": {"type": "integer", "minimum": 0},
                "desired_state": _ref("Document"),
                "delta": _ref("Delta"),
            }
        ),
        "DeltaResult": _object(
            {
                "device_id": {"type": "string", "pattern": ID_PATTERN},
                "in_sync": {"type": "boolean"},
                "delta": _ref("Delta"),
                "version": {"type": "integer", "minimum": 0},
            }
        ),
        "DevicePage": _object(
            {
                "items": {
                    "type": "array",
                    "items": {"anyOf": [_ref("DeviceWithState"), _ref("DeviceSummary")]},
                },
                "next_cursor": {
                    "type": ["string", "null"],
                    "description": "Pass as `cursor` for the next page; null at the end",
                },
            }
        ),
        "PresenceEvent": presence_event,
        "HistoryEvent": {"oneOf": [presence_event, state_event, metadata_event]},
        "HistoryPage": _object(
            {
                "items": {"type": "array", "items": _ref("HistoryEvent")},
                "next_before": {
                    "type": ["string", "null"],
                    "pattern": STREAM_ID_PATTERN,
                    "description": "Pass as `before` for older events; null at the end",
                },
            }
        ),
        "PresenceEvents": _object(
            {
                "items": {"type": "array", "items": _ref("PresenceEvent")},
                "last_id": {
                    "type": "string",
                    "pattern": STREAM_ID_PATTERN,
                    "description": "Pass as `after` to continue",
                },
                "gap": {
                    "type": "boolean",
                    "description": "True when events after `after` were already trimmed",
                },
            }
        ),
        "Counts": counts,
        "Stats": _object(
            {
                **counts["properties"],
                "by_type": {
                    "type": "object",
                    "additionalProperties": _ref("Counts"),
                    "propertyNames": {"pattern": TYPE_PATTERN},
                },
            }
        ),
        "Session": _object(
            {
                "role": {
                    "type": "string",
                    "enum": ["admin", "read"],
                    "description": "admin: reads and writes; read: reads only",
                }
            }
        ),
        "Token": _object(
            {
                "device_id": {"type": "string", "pattern": ID_PATTERN},
                "token": {"type": "string", "minLength": 1},
            }
        ),
    }


def _paths() -> dict[str, Schema]:
    not_found = {"404": _problem("device-not-found")}
    bad_id = {"422": _problem("invalid-device-id", "invalid-request")}
    return {
        "/api/devices": {
            "post": _operation(
                "registerDevice",
                "Register a device; the response holds its token, shown only once",
                {
                    "201": _json(
                        "Registered",
                        _ref("RegisteredDevice"),
                        {
                            "Location": {
                                "schema": {"type": "string"},
                                "description": "The device's URL",
                            }
                        },
                    ),
                    "409": _problem("device-exists"),
                    "422": _problem(
                        "invalid-request",
                        "invalid-device-id",
                        "invalid-device-type",
                        "invalid-state",
                        "invalid-state-key",
                        "state-too-deep",
                    ),
                    **_BODY_ERRORS,
                },
                write=True,
                body=_ref("RegisterRequest"),
            ),
            "get": _operation(
                "listDevices",
                "One page of devices, filtered",
                {
                    "200": _json("A page", _ref("DevicePage")),
                    "400": _problem("invalid-cursor"),
                    "422": _problem(*_QUERY_422),
                },
                write=False,
                description="Pages are ordered by device id, or by last_seen with "
                "`stale_seconds`. With `stale_seconds` a page may hold fewer than `limit` items "
                "(even none) while `next_cursor` is not null: follow it to the end.",
                parameters=[
                    _query(
                        "status",
                        {"type": "string", "enum": ["online", "offline"]},
                        "Only devices with this presence",
                    ),
                    _query(
                        "type",
                        {"type": "string", "pattern": TYPE_PATTERN},
                        "Only devices of this type",
                    ),
                    _query(
                        "stale_seconds",
                        {"type": "number", "minimum": 0},
                        "Only devices not seen for at least this many seconds",
                    ),
                    _query(
                        "include_state",
                        {"type": "boolean", "default": False},
                        "Add metadata, reported_state and desired_state to each item",
                    ),
                    _LIMIT_DEVICES,
                    _query(
                        "cursor",
                        {"type": "string", "maxLength": 1024},
                        "`next_cursor` of the previous page",
                    ),
                ],
            ),
        },
        "/api/devices/{device_id}": {
            "parameters": [_DEVICE_ID],
            "get": _operation(
                "getDevice",
                "The device and its shadow",
                {"200": _json("The device", _ref("Device")), **not_found, **bad_id},
                write=False,
            ),
            "patch": _operation(
                "patchDeviceMetadata",
                "Merge into the device's metadata (null deletes)",
                {
                    "200": _json("The device after the change", _ref("Device")),
                    **not_found,
                    "422": _problem(
                        "invalid-request",
                        "invalid-device-id",
                        "invalid-state",
                        "invalid-state-key",
                        "state-too-deep",
                    ),
                    **_BODY_ERRORS,
                },
                write=True,
                body=_ref("MetadataPatch"),
            ),
            "delete": _operation(
                "deleteDevice",
                "Deregister the device and close its live socket",
                {"204": {"description": "Deleted"}, **not_found, **bad_id},
                write=True,
            ),
        },
        "/api/devices/{device_id}/desired": {
            "parameters": [_DEVICE_ID],
            "patch": _operation(
                "patchDesiredState",
                "Merge into the desired state; the device is told at once",
                {
                    "200": _json("The desired state after the merge", _ref("DesiredResult")),
                    **not_found,
                    "409": _problem("version-conflict"),
                    "422": _problem(
                        "invalid-request",
                        "invalid-device-id",
                        "invalid-state",
                        "invalid-state-key",
                        "state-too-deep",
                    ),
                    **_BODY_ERRORS,
                },
                write=True,
                body=_ref("DesiredPatch"),
            ),
        },
        "/api/devices/{device_id}/delta": {
            "parameters": [_DEVICE_ID],
            "get": _operation(
                "getDelta",
                "Where reported differs from desired",
                {"200": _json("The delta", _ref("DeltaResult")), **not_found, **bad_id},
                write=False,
            ),
        },
        "/api/devices/{device_id}/history": {
            "parameters": [_DEVICE_ID],
            "get": _operation(
                "getHistory",
                "The device's presence and state changes, newest first",
                {
                    "200": _json("A page of history", _ref("HistoryPage")),
                    "400": _problem("invalid-cursor"),
                    **not_found,
                    **bad_id,
                },
                write=False,
                parameters=[
                    _query(
                        "limit",
                        {
                            "type": "integer",
                            "minimum": 1,
                            "maximum": MAX_HISTORY_PAGE,
                            "default": 50,
                        },
                        "Largest number of events on the page",
                    ),
                    _query(
                        "before",
                        {"type": "string", "pattern": STREAM_ID_PATTERN},
                        "`next_before` of the previous page",
                    ),
                ],
            ),
        },
        "/api/devices/{device_id}/token": {
            "parameters": [_DEVICE_ID],
            "post": _operation(
                "rotateToken",
                "Issue or rotate the device token; the old one stops working",
                {
                    "200": _json("The new token, shown only here", _ref("Token")),
                    **not_found,
                    **bad_id,
                },
                write=True,
            ),
        },
        "/api/presence/events": {
            "get": _operation(
                "presenceEvents",
                "Presence events after a stream id, oldest first",
                {
                    "200": _json("Presence events", _ref("PresenceEvents")),
                    "400": _problem("invalid-cursor"),
                    "422": _problem(*_QUERY_422),
                },
                write=False,
                tag="presence",
                description="`limit` bounds the events read, of every kind; only presence "
                "events are returned, so a page may hold fewer. Continue from `last_id`.",
                parameters=[
                    _query(
                        "after",
                        {"type": "string", "pattern": STREAM_ID_PATTERN, "default": "0-0"},
                        "Return events after this stream id",
                    ),
                    _LIMIT_DEVICES,
                ],
            ),
        },
        "/api/stats": {
            "get": _operation(
                "stats",
                "Counts: registered, online, offline, per type",
                {"200": _json("Counts", _ref("Stats")), "422": _problem(*_QUERY_422)},
                write=False,
                tag="presence",
            ),
        },
        "/api/session": {
            "get": _operation(
                "getSession",
                "What this request's credential (API key or login cookie) may do",
                {"200": _json("The role", _ref("Session")), "422": _problem(*_QUERY_422)},
                write=False,
                tag="meta",
                description="A dashboard asks this to disable its write controls for a "
                "read-only key. `POST /api/session` (log in) and `DELETE /api/session` (log "
                "out) are described with the dashboard.",
            ),
        },
        "/openapi.json": {
            "get": {
                "operationId": "openapi",
                "summary": "This document",
                "tags": ["meta"],
                "security": [],
                "responses": {"200": _json("OpenAPI 3.1", {"type": "object"})},
            }
        },
    }


@functools.cache
def _build() -> Schema:
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Presence gateway REST API",
            "version": "1",
            "description": "Device registry, shadows and presence. Errors are "
            "application/problem+json (RFC 9457) with a stable `type`.",
        },
        "servers": [{"url": "/"}],
        "security": [{"apiKey": []}],
        "tags": [
            {"name": "devices", "description": "Registry and shadows"},
            {"name": "presence", "description": "Presence events and counts"},
            {"name": "meta", "description": "About the API itself"},
        ],
        "paths": _paths(),
        "components": {
            "securitySchemes": {
                "apiKey": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "An admin key (read and write) or a read-only key",
                }
            },
            "parameters": {
                "DeviceId": {
                    "name": "device_id",
                    "in": "path",
                    "required": True,
                    "schema": {"type": "string", "pattern": ID_PATTERN},
                }
            },
            "schemas": _schemas(),
        },
    }


def document() -> Schema:
    """The OpenAPI 3.1 document (a fresh copy: callers may change it)."""
    return copy.deepcopy(_build())
