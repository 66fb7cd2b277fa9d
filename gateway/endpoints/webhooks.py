"""REST endpoints of webhooks: create, list, read, change, delete, rotate the secret, recent
deliveries, replay. Admin key only (an endpoint's URL and deliveries are the operator's).

Thin: inputs checked against the contract, one call into `gateway.webhooks.store`; a target is
checked (resolved, no loopback/private address unless allowed) before anything is stored.
"""

from __future__ import annotations

import time

from msgspec import UNSET
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from gateway import contract
from gateway.contract import Reply
from gateway.endpoints.api import ORJSONResponse, endpoint, given
from gateway.runtime import Gateway, NotReady
from gateway.webhooks import model
from gateway.webhooks.delivery import refused_target
from gateway.webhooks.model import TargetRefused, Webhook
from gateway.webhooks.signing import new_secret
from gateway.webhooks.store import WebhookStore

ON_WEBHOOK = ("webhook-not-found",)
TARGET = ("webhook-target-refused",)


def _parts(request: Request) -> tuple[Gateway, WebhookStore]:
    gateway: Gateway = request.app.state.gateway
    if gateway.webhooks is None:
        raise NotReady("the gateway has not reached Redis yet")
    return gateway, gateway.webhooks


async def _check_target(gateway: Gateway, url: str) -> None:
    parts = model.check_url(url)
    if gateway.settings.webhook_allow_private:
        return
    try:
        reason = await refused_target(parts.hostname or "")
    except OSError as exc:
        raise TargetRefused(f"cannot resolve {parts.hostname}: {exc}") from None
    if reason is not None:
        raise TargetRefused(
            f"{reason}: the gateway does not send into private networks (set "
            "GATEWAY_WEBHOOK_ALLOW_PRIVATE=true to allow it)"
        )


@endpoint(
    Reply(201, contract.WebhookCreated, "Created", headers={"Location": "The webhook's URL"}),
    access="write",
    problems=(*TARGET, "too-many-webhooks"),
    tag="webhooks",
)
async def create_webhook(request: Request, body: contract.WebhookCreate) -> Response:
    """Create a webhook endpoint; the answer holds its signing secret, shown only once.

    It gets every event written from now on that its `types` (and `device_type`) want, POSTed
    as JSON with Standard Webhooks headers.
    """
    gateway, store = _parts(request)
    await _check_target(gateway, body.url)
    webhook = Webhook(
        webhook_id=model.new_id(),
        url=body.url,
        types=tuple(dict.fromkeys(body.types)),
        device_type=given(body.device_type),
        description=body.description,
        enabled=body.enabled,
        status="active" if body.enabled else "disabled",
        created_at=time.time(),
        secret=new_secret(),
        cursor=(await gateway.store.position()).encode(),
    )
    await store.create(webhook)
    return ORJSONResponse(
        {**webhook.to_dict(), "secret": webhook.secret},
        status_code=201,
        headers={"Location": f"/api/webhooks/{webhook.webhook_id}"},
    )


@endpoint(Reply(200, contract.WebhookList, "Every webhook"), access="write", tag="webhooks")
async def list_webhooks(request: Request) -> Response:
    """Every webhook endpoint (at most GATEWAY_WEBHOOK_MAX_ENDPOINTS)."""
    _, store = _parts(request)
    return ORJSONResponse({"items": [w.to_dict() for w in await store.all()]})


@endpoint(
    Reply(200, contract.Webhook, "The webhook"), access="write", problems=ON_WEBHOOK,
    tag="webhooks",
)  # fmt: skip
async def get_webhook(request: Request, webhook_id: contract.WebhookId) -> Response:
    """One webhook endpoint and where its delivery stands."""
    _, store = _parts(request)
    return ORJSONResponse((await store.get(webhook_id)).to_dict())


@endpoint(
    Reply(200, contract.Webhook, "Changed"),
    access="write",
    problems=(*ON_WEBHOOK, *TARGET),
    tag="webhooks",
)
async def patch_webhook(
    request: Request, webhook_id: contract.WebhookId, body: contract.WebhookPatch
) -> Response:
    """Change a webhook endpoint.

    `{"enabled": false}` stops delivery; `{"enabled": true}` resumes it from where it stopped
    (also for a `failing` endpoint: its retries start over).
    """
    gateway, store = _parts(request)
    await store.get(webhook_id)
    fields: dict[str, str] = {}
    if body.url is not UNSET:
        await _check_target(gateway, body.url)
        fields["url"] = body.url
    if body.types is not UNSET:
        fields["types"] = ",".join(dict.fromkeys(body.types))
    if body.device_type is not UNSET:
        fields["device_type"] = body.device_type or ""
    if body.description is not UNSET:
        fields["description"] = body.description
    if body.enabled is not UNSET:
        fields["enabled"] = "1" if body.enabled else "0"
        fields["status"] = "active" if body.enabled else "disabled"
        if body.enabled:
            fields |= {"failing_since": "", "last_error": ""}
    return ORJSONResponse((await store.update(webhook_id, fields)).to_dict())


@endpoint(Reply(204), access="write", problems=ON_WEBHOOK, tag="webhooks")
async def delete_webhook(request: Request, webhook_id: contract.WebhookId) -> Response:
    """Delete a webhook endpoint; an attempt in flight may still arrive."""
    _, store = _parts(request)
    await store.delete(webhook_id)
    return Response(status_code=204)


@endpoint(
    Reply(200, contract.WebhookSecret, "The new secret"), access="write", problems=ON_WEBHOOK,
    tag="webhooks",
)  # fmt: skip
async def rotate_webhook_secret(request: Request, webhook_id: contract.WebhookId) -> Response:
    """A new signing secret, shown only here.

    Deliveries are signed with both the new and the previous secret for 24 hours (two
    signatures in `webhook-signature`), so receivers can switch without missing one.
    """
    _, store = _parts(request)
    return ORJSONResponse({"secret": await store.rotate(webhook_id)})


@endpoint(
    Reply(200, contract.DeliveryPage, "Recent attempts"), access="write", problems=ON_WEBHOOK,
    tag="webhooks",
)  # fmt: skip
async def list_webhook_deliveries(
    request: Request, webhook_id: contract.WebhookId, query: contract.DeliveriesQuery
) -> Response:
    """The endpoint's recent delivery attempts, newest first: status code, latency, error."""
    _, store = _parts(request)
    return ORJSONResponse({"items": await store.deliveries(webhook_id, query.limit)})


@endpoint(
    Reply(202, contract.Webhook, "Replaying"),
    access="write",
    problems=(*ON_WEBHOOK, "invalid-cursor"),
    tag="webhooks",
)
async def replay_webhook(
    request: Request, webhook_id: contract.WebhookId, query: contract.ReplayQuery
) -> Response:
    """Deliver again every event after a position (an event's id on one node, an SSE `id:`,
    or a cursor), in order; an attempt in flight for the old cursor is dropped."""
    gateway, store = _parts(request)
    position = gateway.store.events.decode(query.after)
    return ORJSONResponse(
        (await store.replay(webhook_id, position.encode())).to_dict(), status_code=202
    )


_ONE = "/api/webhooks/{webhook_id}"
routes: list[BaseRoute] = [
    Route("/api/webhooks", create_webhook, methods=["POST"]),
    Route("/api/webhooks", list_webhooks, methods=["GET"]),
    Route(_ONE, get_webhook, methods=["GET"]),
    Route(_ONE, patch_webhook, methods=["PATCH"]),
    Route(_ONE, delete_webhook, methods=["DELETE"]),
    Route(_ONE + "/rotate-secret", rotate_webhook_secret, methods=["POST"]),
    Route(_ONE + "/deliveries", list_webhook_deliveries, methods=["GET"]),
    Route(_ONE + "/replay", replay_webhook, methods=["POST"]),
]
