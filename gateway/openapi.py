"""`/openapi.json`, built from the route table and the contract; nothing here restates a path,
a field or a limit.

Every HTTP route's endpoint has a declared `contract.Operation` (the REST endpoints declare
theirs through their signature, see `endpoints.api.endpoint`; `describe` declares the rest).
Paths and methods come from the routes, schemas from the contract's msgspec types, problem
responses from the problem table. A route with no declaration is an error, not a gap.
"""

from __future__ import annotations

import http
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import msgspec
from starlette.routing import BaseRoute, Route

from gateway import contract
from gateway.contract import Operation, Reply
from gateway.problems import KINDS, TYPE_BASE

Schema = dict[str, Any]

REF = "#/components/schemas/{name}"
PROBLEM_MEDIA_TYPE = "application/problem+json"
TAGS = {
    "devices": "Registry and shadows",
    "presence": "Presence events and counts",
    "commands": "Commands to devices: results, timeouts and an offline queue",
    "events": "The fleet event log as a resumable Server-Sent Events stream",
    "webhooks": "Fleet events POSTed to your endpoints, signed as Standard Webhooks",
    "session": "The credential of a request, and the dashboard's login cookie",
    "operations": "Liveness, readiness and metrics",
    "meta": "About the API itself",
}

_OPERATIONS: dict[Callable[..., Any], Operation | None] = {}


def describe(endpoint: Callable[..., Any], operation: Operation | None) -> None:
    """Declare what *endpoint* takes and answers; None leaves it out of the document on purpose."""
    _OPERATIONS[endpoint] = operation


def operations(routes: Iterable[BaseRoute]) -> Iterator[tuple[str, str, Operation]]:
    """(path, method, operation) for every HTTP route, HEAD aside.

    WebSocket routes (described in protocol.md) and mounted static files are no operations.
    Raises LookupError for a route whose endpoint declares nothing, or other path parameters.
    """
    for route in routes:
        if not isinstance(route, Route):
            continue
        if route.endpoint not in _OPERATIONS:
            raise LookupError(f"{route.path}: {route.endpoint.__qualname__} declares no operation")
        operation = _OPERATIONS[route.endpoint]
        if operation is None:
            continue
        if set(operation.path) != set(route.param_convertors):
            raise LookupError(f"{route.path}: the endpoint declares {sorted(operation.path)}")
        for method in sorted((route.methods or set()) - {"HEAD"}):
            yield route.path, method.lower(), operation


def document(routes: Iterable[BaseRoute]) -> Schema:
    """The OpenAPI 3.1 document of *routes* (an app's route table)."""
    found = list(operations(routes))
    types: list[Any] = [contract.Problem]
    for _, _, operation in found:
        bodies = [operation.body, *(reply.body for reply in operation.replies)]
        types += [body for body in bodies if body is not None and body not in types]
    schemas, components = msgspec.json.schema_components(types, ref_template=REF)

    def schema(of: Any) -> Schema:
        return schemas[types.index(of)]

    paths: dict[str, Schema] = {}
    for path, method, operation in found:
        paths.setdefault(path, {})[method] = _operation(operation, schema)
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
        "tags": [{"name": name, "description": text} for name, text in TAGS.items()],
        "paths": paths,
        "components": {
            "securitySchemes": {
                "apiKey": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "An admin key (read and write) or a read-only key",
                }
            },
            "schemas": components,
        },
    }


def _operation(operation: Operation, schema: Callable[[Any], Schema]) -> Schema:
    described: Schema = {
        "operationId": operation.operation_id,
        "summary": operation.summary,
        "tags": [operation.tag],
        "parameters": _parameters(operation),
        "responses": _responses(operation, schema),
    }
    if operation.description:
        described["description"] = operation.description
    if operation.body is not None:
        described["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": schema(operation.body)}},
        }
    if operation.access == "public":
        described["security"] = []
    return described


def _parameters(operation: Operation) -> list[Schema]:
    parameters = [
        _parameter(name, "path", annotation, True, msgspec.NODEFAULT)
        for name, annotation in operation.path.items()
    ]
    if operation.query is not None:
        parameters += [
            _parameter(f.encode_name, "query", f.type, f.required, f.default)
            for f in msgspec.structs.fields(operation.query)
        ]
    return parameters


def _parameter(name: str, where: str, annotation: Any, required: bool, default: Any) -> Schema:
    schema = msgspec.json.schema(annotation)
    parameter: Schema = {"name": name, "in": where, "required": required}
    if "description" in schema:
        parameter["description"] = schema.pop("description")
    if default is not msgspec.NODEFAULT and default is not msgspec.UNSET:
        schema["default"] = default
    parameter["schema"] = schema
    return parameter


def _responses(operation: Operation, schema: Callable[[Any], Schema]) -> Schema:
    responses = {str(reply.status): _reply(reply, schema) for reply in operation.replies}
    by_status: dict[int, list[str]] = {}
    for kind in sorted({*operation.problems, "internal-error"}):
        by_status.setdefault(KINDS[kind].status, []).append(kind)
    for status, kinds in by_status.items():
        responses[str(status)] = _problem(kinds)
    return dict(sorted(responses.items()))


def _reply(reply: Reply, schema: Callable[[Any], Schema]) -> Schema:
    response: Schema = {"description": reply.description or http.HTTPStatus(reply.status).phrase}
    if reply.body is not None:
        response["content"] = {reply.media_type: {"schema": schema(reply.body)}}
    if reply.headers:
        response["headers"] = {
            name: {"description": text, "schema": {"type": "string"}, "required": True}
            for name, text in reply.headers.items()
        }
    return response


def _problem(kinds: list[str]) -> Schema:
    """A problem+json response that may carry any of *kinds* (all share one status)."""
    response: Schema = {
        "description": "; ".join(f"`{kind}`: {KINDS[kind].title}" for kind in kinds),
        "content": {
            PROBLEM_MEDIA_TYPE: {
                "schema": {
                    "allOf": [
                        {"$ref": REF.format(name="Problem")},
                        {"properties": {"type": {"enum": [TYPE_BASE + kind for kind in kinds]}}},
                    ]
                }
            }
        },
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
    return response
