"""REST API: thin endpoints that make one store call and respond.

A handler's signature is its input contract: `device_id` (or any other path parameter) typed
with a contract name, `query` and `body` typed with contract Structs, plus `request` and
`store` when it needs them. `endpoint` checks a request against those types before the
handler runs, and records them with the handler's reply and docstring for `/openapi.json`.

Every failure leaves as `application/problem+json` (RFC 9457) built from `gateway.problems`,
and every refusal happens before anything is written, so a bad request never changes Redis.
"""

from __future__ import annotations

import functools
import http
import inspect
import logging
import typing
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, TypeVar

import orjson
from msgspec import UnsetType
from redis.exceptions import ClusterDownError, RedisClusterException, TryAgainError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Match, Route

from gateway import contract, logins, openapi, shadow, validation
from gateway.auth import Role, bearer
from gateway.backlog import Backlog
from gateway.contract import MAX_BODY_BYTES, Access, Operation, Reply
from gateway.endpoints import health
from gateway.errors import GatewayError
from gateway.problems import KINDS, Problem, from_error
from gateway.runtime import Gateway
from gateway.store import Store

log = logging.getLogger("gateway.api")
# Redis cannot answer now (down, or a cluster failing over or moving slots): 503, try again
REDIS_UNAVAILABLE = (
    RedisConnectionError, RedisTimeoutError, ClusterDownError, TryAgainError,
    RedisClusterException, OSError,
)  # fmt: skip

PROBLEM_MEDIA_TYPE = "application/problem+json"
REALM = 'Bearer realm="presence-gateway"'
CLIENT_CLOSED = 499  # nginx's "client closed request": there is no one left to send it to
INPUTS = ("query", "body")
CONTEXT = ("request", "store")

Endpoint = Callable[[Request], Awaitable[Response]]
T = TypeVar("T")


class ORJSONResponse(Response):
    """JSON rendered by orjson: faster than the stdlib, and strict about what is JSON."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


def given(value: T | UnsetType) -> T | None:
    """An optional query parameter: None when absent."""
    return None if isinstance(value, UnsetType) else value


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
    elif problem.kind in ("redis-unavailable", "write-contention", "command-queue-full"):
        extra["Retry-After"] = "1"
    return ORJSONResponse(
        problem.body(instance=_instance(request)),
        status_code=problem.status,
        headers=extra,
        media_type=PROBLEM_MEDIA_TYPE,
    )


# --- auth ---------------------------------------------------------------------
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


# --- the endpoint wrapper -----------------------------------------------------------
def endpoint(
    reply: Reply | tuple[Reply, ...],
    *,
    access: Access = "read",
    problems: Iterable[str] = (),
    tag: str = "devices",
    body_limit: int = MAX_BODY_BYTES,
) -> Callable[[Callable[..., Awaitable[Response]]], Endpoint]:
    """Authorize, check the declared inputs, run the handler; every failure becomes a problem.

    *problems* are the kinds the handler or the store may raise beyond what the inputs and
    *access* imply.
    """

    def wrap(handler: Callable[..., Awaitable[Response]]) -> Endpoint:
        operation = _declare(handler, reply, access, problems, tag, body_limit)
        wanted = tuple(inspect.signature(handler).parameters)

        @functools.wraps(handler)
        async def run(request: Request) -> Response:
            gateway: Gateway = request.app.state.gateway
            try:
                if access != "public":
                    request.state.role = await _authorize(request, gateway, access == "write")
                args = {"request": request, "store": gateway.store}
                args |= await _inputs(request, operation)
                return await handler(**{name: args[name] for name in wanted})
            except Problem as problem:
                return problem_response(request, problem)
            except (GatewayError, shadow.ShadowError) as error:
                return problem_response(request, from_error(error))
            except ClientDisconnect:
                # gone mid-body: nothing was written, and no answer can reach it
                log.debug("%s %s: the client left mid-request", request.method, request.url.path)
                return Response(status_code=CLIENT_CLOSED)
            except REDIS_UNAVAILABLE as exc:
                log.warning("%s %s: Redis unavailable: %s", request.method, request.url.path, exc)
                return problem_response(
                    request, Problem("redis-unavailable", "the gateway cannot reach Redis now")
                )
            except Exception:  # never a stack trace to the client; the log gets it
                log.exception("%s %s failed", request.method, request.url.path)
                return problem_response(
                    request, Problem("internal-error", "the gateway failed to answer")
                )

        openapi.describe(run, operation)
        return run

    return wrap


def _declare(
    handler: Callable[..., Awaitable[Response]],
    reply: Reply | tuple[Reply, ...],
    access: Access,
    problems: Iterable[str],
    tag: str,
    body_limit: int,
) -> Operation:
    """The operation *handler*'s signature, reply and docstring declare."""
    hints = typing.get_type_hints(handler, include_extras=True)
    names = inspect.signature(handler).parameters
    path = {name: hints[name] for name in names if name not in (*INPUTS, *CONTEXT)}
    query, body = (hints[name] if name in names else None for name in INPUTS)
    kinds = {*problems, *validation.problems(query)}
    for annotation in path.values():
        kinds |= validation.Declared.of(annotation).problems()
    if body is not None:
        kinds |= validation.problems(body)
        kinds |= {"invalid-json", "body-too-large", "unsupported-media-type"}
    if access != "public":
        kinds |= {"unauthorized", "redis-unavailable"}
    if access == "write":
        kinds |= {"forbidden", "write-contention"}
    summary, _, description = (inspect.getdoc(handler) or "").partition("\n\n")
    first, *rest = handler.__name__.split("_")
    return Operation(
        operation_id=first + "".join(word.title() for word in rest),
        summary=" ".join(summary.split()).removesuffix("."),
        description=" ".join(description.split()),
        access=access,
        replies=(reply,) if isinstance(reply, Reply) else reply,
        tag=tag,
        path=path,
        query=query,
        body=body,
        body_limit=body_limit,
        problems=frozenset(kinds),
    )


async def _inputs(request: Request, operation: Operation) -> dict[str, Any]:
    """The path, query and body, checked against their declarations (in that order)."""
    inputs = {
        name: validation.path(name, request.path_params[name], annotation)
        for name, annotation in operation.path.items()
    }
    query = validation.query(request.query_params.multi_items(), operation.query)
    if query is not None:
        inputs["query"] = query
    if operation.body is not None:
        raw = await _read_json(request, operation.body_limit)
        inputs["body"] = validation.body(raw, operation.body)
    return inputs


def _is_json_media(content_type: str) -> bool:
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or (
        media.startswith("application/") and media.endswith("+json")
    )


async def _read_json(request: Request, limit: int) -> object:
    """The body as JSON; refuses an oversize body without reading it whole."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            detail = "Content-Length must be a byte count"
            raise Problem("invalid-request", detail, parameter="Content-Length")
        if int(declared) > limit:
            raise Problem("body-too-large", f"bodies are limited to {limit} bytes here")
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
        if size > limit:
            raise Problem("body-too-large", f"bodies are limited to {limit} bytes here")
        chunks.append(chunk)
    raw = b"".join(chunks)
    if not raw.strip():
        raise Problem("invalid-json", "the body is empty; send a JSON object")
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise Problem("invalid-json", f"the body is not valid JSON: {exc}") from exc


# --- endpoints ----------------------------------------------------------------
ON_DEVICE = ("device-not-found",)
PRESENCE = frozenset({"presence"})


@endpoint(
    Reply(201, contract.RegisteredDevice, "Registered", headers={"Location": "The device's URL"}),
    access="write",
    problems=("device-exists",),
)
async def register_device(store: Store, body: contract.RegisterRequest) -> Response:
    """Register a device; the response holds its token, shown only once."""
    # `null` means "absent" in a merge document, so it has nothing to store at registration
    metadata = shadow.merge({}, body.metadata)
    device, token = await store.register(body.device_id, body.device_type, metadata)
    return ORJSONResponse(
        {**device.to_dict(), "token": token},
        status_code=201,
        headers={"Location": f"/api/devices/{device.device_id}"},
    )


@endpoint(Reply(200, contract.DevicePage, "A page"))
async def list_devices(store: Store, query: contract.DeviceQuery) -> Response:
    """One page of devices, filtered.

    Pages are ordered by device id, or by last_seen with `stale_seconds`. With `stale_seconds`
    a page may hold fewer than `limit` items (even none) while `next_cursor` is not null:
    follow it to the end.
    """
    prefix = given(query.prefix)
    if prefix is not None:
        if given(query.stale_seconds) is not None:
            raise Problem(
                "invalid-request",
                "prefix and stale_seconds cannot be combined: a prefix pages in id order, "
                "stale_seconds in last-seen order",
                parameter="prefix",
            )
        page = await store.queries.search(
            prefix,
            status=given(query.status),
            device_type=given(query.type),
            include_state=query.include_state,
            limit=query.limit,
            cursor=given(query.cursor) or None,
        )
        return ORJSONResponse({"items": page.items, "next_cursor": page.next_cursor})
    page = await store.page(
        status=given(query.status),
        device_type=given(query.type),
        stale_seconds=given(query.stale_seconds),
        include_state=query.include_state,
        limit=query.limit,
        cursor=given(query.cursor) or None,  # `?cursor=` starts at the beginning
    )
    return ORJSONResponse({"items": page.items, "next_cursor": page.next_cursor})


@endpoint(Reply(200, contract.Device, "The device"), problems=ON_DEVICE)
async def get_device(store: Store, device_id: contract.DeviceId) -> Response:
    """The device and its shadow."""
    return ORJSONResponse((await store.require(device_id)).to_dict())


@endpoint(
    Reply(200, contract.Device, "The device after the change"), access="write", problems=ON_DEVICE
)
async def patch_device_metadata(
    store: Store, device_id: contract.DeviceId, body: contract.MetadataPatch
) -> Response:
    """Merge into the device's metadata (null deletes)."""
    await store.patch_section(device_id, "metadata", body.metadata)
    return ORJSONResponse((await store.require(device_id)).to_dict())


@endpoint(Reply(204, description="Deleted"), access="write", problems=ON_DEVICE)
async def delete_device(store: Store, device_id: contract.DeviceId) -> Response:
    """Deregister the device and close its live socket."""
    await store.delete(device_id)
    return Response(status_code=204)


@endpoint(
    Reply(200, contract.DesiredResult, "The desired state after the merge"),
    access="write",
    problems=(*ON_DEVICE, "version-conflict"),
)
async def patch_desired_state(
    store: Store, device_id: contract.DeviceId, body: contract.DesiredPatch
) -> Response:
    """Merge into the desired state; the device is told at once."""
    versions, desired = await store.patch_section(
        device_id, "desired", body.state, body.version, body.desired_version
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


@endpoint(Reply(200, contract.DeltaResult, "The delta"), problems=ON_DEVICE)
async def get_delta(store: Store, device_id: contract.DeviceId) -> Response:
    """Where reported differs from desired."""
    return ORJSONResponse(await store.delta(device_id))


@endpoint(Reply(200, contract.HistoryPage, "A page of history"), problems=ON_DEVICE)
async def get_history(
    store: Store, device_id: contract.DeviceId, query: contract.HistoryQuery
) -> Response:
    """The device's presence and state changes, newest first."""
    items, next_before = await store.history(device_id, query.limit, given(query.before))
    return ORJSONResponse({"items": items, "next_before": next_before})


@endpoint(Reply(200, contract.PresenceEvents, "Presence events"), tag="presence")
async def presence_events(store: Store, query: contract.EventsQuery) -> Response:
    """Presence events after a position, oldest first.

    `limit` bounds the events read, of every kind; only presence events are returned, so a
    page may hold fewer. Continue from `last_id`. Positions are opaque: pass back what the
    gateway gave; one it did not issue is `invalid-cursor`.
    """
    items, last, gap = await store.events_after(query.after, query.limit, frozenset({"presence"}))
    # `last_id` is where the next call continues: past filtered-out events, never backwards
    return ORJSONResponse({"items": items, "last_id": last or query.after, "gap": gap})


@endpoint(Reply(200, contract.LatestPresenceEvents, "Presence events"), tag="presence")
async def latest_presence_events(store: Store, query: contract.LatestQuery) -> Response:
    """The newest presence events at or before a position, newest first.

    A dashboard shows the latest events on load with no gap or duplicate at the join: read
    back from its snapshot's `cursor` here, and take live events after it from the socket.
    Continue with `upto=<next_upto>` for older events. `limit` bounds the events returned; at
    most 5,000 fleet events (of every kind) are read per call, so a page may hold fewer while
    `next_upto` is not null.
    """
    upto = given(query.upto)
    position = store.events.decode(upto) if upto is not None else await store.position()
    page = await Backlog(store.events).latest(position, query.limit, PRESENCE)
    following = page.next.encode() if page.next is not None else None
    return ORJSONResponse({"items": page.items, "next_upto": following})


@endpoint(Reply(200, contract.FleetHistory, "Points, oldest first"), tag="presence")
async def fleet_history(request: Request, query: contract.FleetHistoryQuery) -> Response:
    """The fleet's counts over the last hour, day or week.

    One point per sample interval (`GATEWAY_FLEET_SAMPLE_INTERVAL`, 10 s by default) for the
    hour, one per 6 for the day, one per 60 for the week; a coarse point keeps the lowest and
    highest online count seen since the one before it. Written by one gateway process per
    interval, however many run; a missing point is a gap (no process could write it).
    """
    gateway: Gateway = request.app.state.gateway
    return Response(await gateway.core.fleet.read(query.range), media_type="application/json")


@endpoint(Reply(200, contract.Stats, "Counts"), tag="presence")
async def stats(store: Store) -> Response:
    """Counts: registered, online, offline, per type."""
    return ORJSONResponse(await store.stats())


@endpoint(
    Reply(200, contract.TokenResult, "The new token, shown only here"),
    access="write",
    problems=ON_DEVICE,
)
async def rotate_token(store: Store, device_id: contract.DeviceId) -> Response:
    """Issue or rotate the device token; the old one stops working."""
    return ORJSONResponse({"device_id": device_id, "token": await store.rotate_token(device_id)})


@endpoint(Reply(200, contract.Session, "The role"), tag="session")
async def get_session(request: Request) -> Response:
    """What this request's credential (API key or login cookie) may do.

    A dashboard asks this to disable its write controls for a read-only key.
    """
    role: Role = request.state.role
    return ORJSONResponse({"role": role.value})


@endpoint(Reply(200, dict[str, Any], "OpenAPI 3.1"), access="public", tag="meta")
async def get_openapi(request: Request) -> Response:
    """This document, built from the route table."""
    state = request.app.state
    if getattr(state, "openapi", None) is None:
        state.openapi = orjson.dumps(openapi.document(request.app.routes))
    return Response(state.openapi, media_type="application/json")


# --- routes served by other modules, described with the rest --------------------------
def _described(endpoint: Callable[..., Any], summary: str, *replies: Reply) -> None:
    name = endpoint.__name__
    operation = Operation(name, summary, "public", replies, tag="operations")
    openapi.describe(endpoint, operation)


_described(health.healthz, "The process is alive", Reply(200, contract.Health, "Alive"))
_described(
    health.readyz,
    "Whether Redis answers now: a load balancer sends traffic only while it does",
    Reply(200, contract.Readiness, "Ready"),
    Reply(503, contract.Readiness, "Redis does not answer, or the gateway is still starting"),
)
_described(
    health.metrics,
    "Prometheus metrics",
    Reply(200, str, "Prometheus text format", media_type="text/plain; version=0.0.4"),
)


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


openapi.describe(api_fallback, None)  # every path it answers is simply not there


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
    Route(_DEVICE, patch_device_metadata, methods=["PATCH"]),
    Route(_DEVICE, delete_device, methods=["DELETE"]),
    Route(_DEVICE + "/desired", patch_desired_state, methods=["PATCH"]),
    Route(_DEVICE + "/delta", get_delta, methods=["GET"]),
    Route(_DEVICE + "/history", get_history, methods=["GET"]),
    Route(_DEVICE + "/token", rotate_token, methods=["POST"]),
    Route("/api/presence/events", presence_events, methods=["GET"]),
    Route("/api/presence/latest", latest_presence_events, methods=["GET"]),
    Route("/api/stats", stats, methods=["GET"]),
    Route("/api/stats/history", fleet_history, methods=["GET"]),
    Route("/api/session", get_session, methods=["GET"]),
    Route("/openapi.json", get_openapi, methods=["GET"]),
]

_EVERY_METHOD = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "CONNECT"]
routes: list[BaseRoute] = [*_ROUTES, Route("/api/{rest:path}", api_fallback, methods=_EVERY_METHOD)]
