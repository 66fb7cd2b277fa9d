"""REST API: thin endpoints that validate, make one store call and respond.

Every failure leaves as `application/problem+json` (RFC 9457) built from `gateway.problems`,
and every refusal happens before anything is written, so a bad request never changes Redis.
"""

from __future__ import annotations

import functools
import http
import logging
import math
import re
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import orjson
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Match, Route

from gateway import logins, openapi, shadow
from gateway.auth import Role, bearer
from gateway.errors import GatewayError
from gateway.keys import is_device_id, is_device_type
from gateway.problems import KINDS, Problem
from gateway.runtime import Gateway
from gateway.store import MAX_PAGE, Store

log = logging.getLogger("gateway.api")

MAX_BODY_BYTES = 256 * 1024
MAX_HISTORY_PAGE = 500
DEFAULT_PAGE = 100
DEFAULT_HISTORY_PAGE = 50
MAX_CURSOR_LENGTH = 1024
STREAM_ID = re.compile(r"[0-9]{1,20}(-[0-9]{1,20})?")
PROBLEM_MEDIA_TYPE = "application/problem+json"
REALM = 'Bearer realm="presence-gateway"'

Handler = Callable[[Request, Store], Awaitable[Response]]
Endpoint = Callable[[Request], Awaitable[Response]]


class ORJSONResponse(Response):
    """JSON rendered by orjson: faster than the stdlib, and strict about what is JSON."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


# --- problems ---------------------------------------------------------------
def _instance(request: Request) -> str:
    """The path as the client sent it (still percent-encoded): a valid URI reference."""
    raw = request.scope.get("raw_path")
    if isinstance(raw, bytes):
        return raw.decode("latin-1").partition("?")[0]
    return request.url.path


def problem_response(
    request: Request, problem: Problem, headers: dict[str, str] | None = None
) -> Response:
    extra = dict(headers or {})
    if problem.kind == "unauthorized":
        # RFC 6750: a presented but unknown key is an invalid token, a missing one is not
        presented = bearer(request.headers.get("authorization"))
        extra["WWW-Authenticate"] = REALM + (', error="invalid_token"' if presented else "")
    elif problem.kind in ("redis-unavailable", "write-contention"):
        extra["Retry-After"] = "1"
    return ORJSONResponse(
        problem.body(instance=_instance(request)),
        status_code=problem.status,
        headers=extra,
        media_type=PROBLEM_MEDIA_TYPE,
    )


def _from_shadow(error: shadow.ShadowError) -> Problem:
    if isinstance(error, shadow.VersionConflict):
        # the stale precondition with what was expected, and every version as it is now
        return Problem(
            "version-conflict",
            error.detail,
            parameter=error.field,
            **{f"expected_{error.field}": error.expected},
            current_version=error.versions.version,
            current_desired_version=error.versions.desired,
            current_reported_version=error.versions.reported,
        )
    return Problem(error.problem, error.detail, **({"path": error.path} if error.path else {}))


def _invalid(parameter: str, detail: str) -> Problem:
    return Problem("invalid-request", detail, parameter=parameter)


# --- auth and the endpoint wrapper -------------------------------------------
async def _authorize(request: Request, gateway: Gateway, write: bool) -> Role:
    """An API key in the header, or the dashboard's login cookie (same-origin writes only)."""
    role = gateway.api_keys.role(bearer(request.headers.get("authorization")))
    cookie = request.cookies.get(logins.COOKIE)
    if role is None and cookie and "authorization" not in request.headers:
        role = await logins.resolve(gateway.redis, gateway.keys, cookie)
        if (
            role is not None
            and write
            and not logins.same_origin(
                request.headers.get("origin"),
                request.headers.get("host"),
                gateway.settings.allowed_origins,
            )
        ):
            raise Problem("forbidden", "cookie-authenticated writes must come from this origin")
    if role is None:
        raise Problem("unauthorized", "send an API key as `Authorization: Bearer <key>`")
    if write and role is not Role.ADMIN:
        raise Problem("forbidden", "this API key is read-only; writes need an admin key")
    return role


def endpoint(*, write: bool) -> Callable[[Handler], Endpoint]:
    """Authorize, run the handler, and turn every failure into a problem response."""

    def wrap(handler: Handler) -> Endpoint:
        @functools.wraps(handler)
        async def run(request: Request) -> Response:
            gateway: Gateway = request.app.state.gateway
            try:
                request.state.role = await _authorize(request, gateway, write)
                return await handler(request, gateway.store)
            except Problem as problem:
                return problem_response(request, problem)
            except GatewayError as error:
                return problem_response(
                    request, Problem(error.problem, error.detail, **error.extra)
                )
            except shadow.ShadowError as error:
                return problem_response(request, _from_shadow(error))
            except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
                log.warning("%s %s: Redis unavailable: %s", request.method, request.url.path, exc)
                return problem_response(
                    request, Problem("redis-unavailable", "the gateway cannot reach Redis now")
                )
            except Exception:  # never a stack trace to the client; the log gets it
                log.exception("%s %s failed", request.method, request.url.path)
                return problem_response(
                    request, Problem("internal-error", "the gateway failed to answer")
                )

        return run

    return wrap


# --- input ------------------------------------------------------------------
def _path_id(request: Request) -> str:
    device_id: str = request.path_params["device_id"]
    if not is_device_id(device_id):
        raise Problem(
            "invalid-device-id",
            f"device_id must be 1–128 characters of A-Z a-z 0-9 . _ -; got {device_id[:140]!r}",
        )
    return device_id


def _is_json_media(content_type: str) -> bool:
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or (
        media.startswith("application/") and media.endswith("+json")
    )


async def _read_object(request: Request) -> dict[str, Any]:
    """The body as a JSON object; refuses oversize bodies without reading them whole."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise _invalid("Content-Length", "Content-Length must be a byte count")
        if int(declared) > MAX_BODY_BYTES:
            raise Problem("body-too-large", f"bodies are limited to {MAX_BODY_BYTES} bytes")
    content_type = request.headers.get("content-type", "")
    if not _is_json_media(content_type):
        raise Problem(
            "unsupported-media-type",
            f"send the body as application/json; got {content_type[:80] or 'no Content-Type'!r}",
        )
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise Problem("body-too-large", f"bodies are limited to {MAX_BODY_BYTES} bytes")
        chunks.append(chunk)
    raw = b"".join(chunks)
    if not raw.strip():
        raise Problem("invalid-json", "the body is empty; send a JSON object")
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise Problem("invalid-json", f"the body is not valid JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise _invalid("body", f"the body must be a JSON object, got {shadow.json_type(value)}")
    return value


def _only(body: dict[str, Any], allowed: Iterable[str]) -> None:
    names = tuple(allowed)
    for name in body:
        if name not in names:
            raise _invalid(name, f"unknown field {name[:80]!r}; expected {', '.join(names)}")


def _required_string(body: dict[str, Any], name: str) -> str:
    if name not in body:
        raise _invalid(name, f"{name} is required")
    value = body[name]
    if not isinstance(value, str):
        raise _invalid(name, f"{name} must be a string, got {shadow.json_type(value)}")
    return value


def _document_field(body: dict[str, Any], name: str, required: bool) -> dict[str, Any]:
    """A state or metadata document: present but not an object is `invalid-state`."""
    if name not in body:
        if required:
            raise _invalid(name, f"{name} is required (a JSON object)")
        return {}
    value = body[name]
    if not isinstance(value, dict):
        detail = f"{name} must be a JSON object, got {shadow.json_type(value)}"
        raise Problem("invalid-state", detail, parameter=name)
    return value


def _version_field(body: dict[str, Any], name: str) -> int | None:
    value = body.get(name)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
        raise _invalid(name, f"{name} must be an integer ≥ 0, got {shadow.json_type(value)}")
    return value


class Query:
    """The query string, refusing parameters an endpoint does not know and repeated ones."""

    def __init__(self, request: Request, allowed: Iterable[str]) -> None:
        names = tuple(allowed)
        self.params = request.query_params
        for name in self.params:
            if name not in names:
                expected = ", ".join(names) if names else "none"
                raise _invalid(name, f"unknown query parameter {name[:80]!r}; expected {expected}")
            if len(self.params.getlist(name)) > 1:
                raise _invalid(name, f"query parameter {name!r} is given more than once")

    def text(self, name: str) -> str | None:
        """An optional string; empty counts as absent (`?cursor=` starts at the beginning)."""
        value = self.params.get(name)
        return value or None

    def choice(self, name: str, options: tuple[str, ...]) -> str | None:
        value = self.params.get(name)
        if value is None:
            return None
        if value not in options:
            raise _invalid(name, f"{name} must be one of {'|'.join(options)}, got {value[:80]!r}")
        return value

    def integer(self, name: str, low: int, high: int, default: int) -> int:
        value = self.params.get(name)
        if value is None:
            return default
        if not re.fullmatch(r"[0-9]{1,9}", value) or not low <= int(value) <= high:
            raise _invalid(name, f"{name} must be an integer {low}–{high}, got {value[:80]!r}")
        return int(value)

    def number(self, name: str) -> float | None:
        value = self.params.get(name)
        if value is None:
            return None
        try:
            number = float(value)
        except ValueError:
            number = math.nan
        if not math.isfinite(number) or number < 0:
            raise _invalid(name, f"{name} must be a number ≥ 0 (seconds), got {value[:80]!r}")
        return number

    def boolean(self, name: str) -> bool:
        value = self.params.get(name)
        if value is None:
            return False
        lowered = value.lower()
        if lowered not in ("true", "false", "1", "0"):
            raise _invalid(name, f"{name} must be true or false, got {value[:80]!r}")
        return lowered in ("true", "1")

    def stream_id(self, name: str) -> str | None:
        value = self.params.get(name)
        if value is None:
            return None
        if not STREAM_ID.fullmatch(value):
            raise _invalid(
                name, f"{name} must be a stream id like 1700000000000-0, got {value[:80]!r}"
            )
        return value


# --- endpoints ----------------------------------------------------------------
@endpoint(write=True)
async def register_device(request: Request, store: Store) -> Response:
    body = await _read_object(request)
    _only(body, ("device_id", "device_type", "metadata"))
    device_id = _required_string(body, "device_id")
    device_type = _required_string(body, "device_type")
    # `null` means "absent" in a merge document, so it has nothing to store at registration
    metadata = shadow.merge({}, _document_field(body, "metadata", required=False))
    device, token = await store.register(device_id, device_type, metadata)
    return ORJSONResponse(
        {**device.to_dict(), "token": token},
        status_code=201,
        headers={"Location": f"/api/devices/{device.device_id}"},
    )


@endpoint(write=False)
async def list_devices(request: Request, store: Store) -> Response:
    query = Query(request, ("status", "type", "stale_seconds", "include_state", "limit", "cursor"))
    status = query.choice("status", ("online", "offline"))
    device_type = query.params.get("type")
    if device_type is not None and not is_device_type(device_type):
        raise _invalid(
            "type", f"type must be 1–64 characters of A-Z a-z 0-9 . _ -, got {device_type[:80]!r}"
        )
    cursor = query.text("cursor")
    if cursor is not None and len(cursor) > MAX_CURSOR_LENGTH:
        raise Problem("invalid-cursor", "cursor is not one this API issued")
    page = await store.page(
        status="online" if status == "online" else "offline" if status == "offline" else None,
        device_type=device_type,
        stale_seconds=query.number("stale_seconds"),
        include_state=query.boolean("include_state"),
        limit=query.integer("limit", 1, MAX_PAGE, DEFAULT_PAGE),
        cursor=cursor,
    )
    return ORJSONResponse({"items": page.items, "next_cursor": page.next_cursor})


@endpoint(write=False)
async def get_device(request: Request, store: Store) -> Response:
    Query(request, ())
    device = await store.require(_path_id(request))
    return ORJSONResponse(device.to_dict())


@endpoint(write=True)
async def patch_device(request: Request, store: Store) -> Response:
    Query(request, ())
    device_id = _path_id(request)
    body = await _read_object(request)
    _only(body, ("metadata",))
    await store.patch_section(device_id, "metadata", _document_field(body, "metadata", True))
    return ORJSONResponse((await store.require(device_id)).to_dict())


@endpoint(write=True)
async def delete_device(request: Request, store: Store) -> Response:
    Query(request, ())
    await store.delete(_path_id(request))
    return Response(status_code=204)


@endpoint(write=True)
async def patch_desired(request: Request, store: Store) -> Response:
    Query(request, ())
    device_id = _path_id(request)
    body = await _read_object(request)
    _only(body, ("state", "version", "desired_version"))
    patch = _document_field(body, "state", required=True)
    version = _version_field(body, "version")
    desired_version = _version_field(body, "desired_version")
    versions, desired = await store.patch_section(
        device_id, "desired", patch, version, desired_version
    )
    device = await store.require(device_id)
    return ORJSONResponse(
        {
            "device_id": device_id,
            "version": versions.version,
            "desired_version": versions.desired,
            "reported_version": versions.reported,
            "desired_state": desired,
            "delta": shadow.delta(desired, device.reported_state),
        }
    )


@endpoint(write=False)
async def get_delta(request: Request, store: Store) -> Response:
    Query(request, ())
    return ORJSONResponse(await store.delta(_path_id(request)))


@endpoint(write=False)
async def get_history(request: Request, store: Store) -> Response:
    query = Query(request, ("limit", "before"))
    device_id = _path_id(request)
    limit = query.integer("limit", 1, MAX_HISTORY_PAGE, DEFAULT_HISTORY_PAGE)
    items, next_before = await store.history(device_id, limit, query.stream_id("before"))
    return ORJSONResponse({"items": items, "next_before": next_before})


@endpoint(write=False)
async def presence_events(request: Request, store: Store) -> Response:
    query = Query(request, ("after", "limit"))
    after = query.stream_id("after") or "0-0"
    limit = query.integer("limit", 1, MAX_PAGE, DEFAULT_PAGE)
    items, last, gap = await store.events_after(after, limit, frozenset({"presence"}))
    # `last_id` is where the next call continues: past filtered-out events, never backwards
    return ORJSONResponse({"items": items, "last_id": last or after, "gap": gap})


@endpoint(write=False)
async def stats(request: Request, store: Store) -> Response:
    Query(request, ())
    return ORJSONResponse(await store.stats())


@endpoint(write=True)
async def rotate_token(request: Request, store: Store) -> Response:
    Query(request, ())
    device_id = _path_id(request)
    return ORJSONResponse({"device_id": device_id, "token": await store.rotate_token(device_id)})


@endpoint(write=False)
async def session_role(request: Request, store: Store) -> Response:
    """What the credential of this request (API key or login cookie) may do."""
    Query(request, ())
    role: Role = request.state.role
    return ORJSONResponse({"role": role.value})


async def openapi_document(request: Request) -> Response:
    return ORJSONResponse(openapi.document())


# --- unknown routes and methods ------------------------------------------------
def _http_problem_body(request: Request, status: int, detail: str) -> dict[str, Any]:
    kind = {404: "not-found", 405: "method-not-allowed"}.get(status)
    if kind is None:
        kind = next((name for name, entry in KINDS.items() if entry.status == status), None)
    if kind is not None:
        return Problem(kind, detail).body(instance=_instance(request))
    return {
        "type": "about:blank",
        "title": http.HTTPStatus(status).phrase,
        "status": status,
        "detail": detail,
        "instance": _instance(request),
    }


async def api_fallback(request: Request) -> Response:
    """Anything under /api no route took: 405 when the path exists, else 404."""
    allowed: set[str] = set()
    # the app's routes, not only this module's: /api/session's login lives beside the dashboard
    for route in request.app.routes:
        match, _ = route.matches(request.scope)
        if match is Match.PARTIAL and isinstance(route, Route) and route.methods:
            allowed |= route.methods
    if allowed:
        problem = Problem("method-not-allowed", f"{request.method} is not allowed here")
        return problem_response(request, problem, {"Allow": ", ".join(sorted(allowed))})
    missing = Problem("not-found", f"no API resource at {_instance(request)}")
    return problem_response(request, missing)


async def _http_exception(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return ORJSONResponse(
        _http_problem_body(request, exc.status_code, exc.detail),
        status_code=exc.status_code,
        headers=dict(exc.headers or {}),
        media_type=PROBLEM_MEDIA_TYPE,
    )


async def _unhandled(request: Request, exc: Exception) -> Response:
    return problem_response(request, Problem("internal-error", "the gateway failed to answer"))


def exception_handlers() -> dict[Any, Callable[[Request, Exception], Awaitable[Response]]]:
    """For `Starlette(exception_handlers=...)`: 404, 405 and 500 outside /api as problems too."""
    return {HTTPException: _http_exception, Exception: _unhandled}


_DEVICE = "/api/devices/{device_id}"
_ROUTES: list[BaseRoute] = [
    Route("/api/devices", register_device, methods=["POST"]),
    Route("/api/devices", list_devices, methods=["GET"]),
    Route(_DEVICE, get_device, methods=["GET"]),
    Route(_DEVICE, patch_device, methods=["PATCH"]),
    Route(_DEVICE, delete_device, methods=["DELETE"]),
    Route(_DEVICE + "/desired", patch_desired, methods=["PATCH"]),
    Route(_DEVICE + "/delta", get_delta, methods=["GET"]),
    Route(_DEVICE + "/history", get_history, methods=["GET"]),
    Route(_DEVICE + "/token", rotate_token, methods=["POST"]),
    Route("/api/presence/events", presence_events, methods=["GET"]),
    Route("/api/stats", stats, methods=["GET"]),
    Route("/api/session", session_role, methods=["GET"]),
    Route("/openapi.json", openapi_document, methods=["GET"]),
]

_EVERY_METHOD = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "CONNECT"]
routes: list[BaseRoute] = [*_ROUTES, Route("/api/{rest:path}", api_fallback, methods=_EVERY_METHOD)]
