"""Webhook endpoints and their rules: what a target may be, how retries are spaced. Pure.

An endpoint is `active` (delivering), `failing` (gave up after the retry limit; re-enable to
resume) or `disabled` (by a PATCH). Its cursor, a fleet-log position, says what it has had:
it moves only after a 2xx, so whichever process delivers next starts from there.
"""

from __future__ import annotations

import ipaddress
import random
import secrets
import urllib.parse
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import orjson

from gateway.errors import GatewayError

Status = Literal["active", "failing", "disabled"]
TYPES = ("presence", "state", "registry", "command")
MAX_URL = 2048
MAX_DESCRIPTION = 500
ID_PREFIX = "wh_"


class WebhookNotFound(GatewayError):
    problem = "webhook-not-found"

    def __init__(self, webhook_id: str) -> None:
        super().__init__(f"no webhook {webhook_id!r}")


class TargetRefused(GatewayError):
    """The URL points where the gateway must not send (SSRF) or cannot."""

    problem = "webhook-target-refused"

    def __init__(self, detail: str) -> None:
        super().__init__(detail, parameter="url")


class TooManyWebhooks(GatewayError):
    problem = "too-many-webhooks"


def new_id() -> str:
    return ID_PREFIX + secrets.token_hex(8)


@dataclass(frozen=True)
class Webhook:
    webhook_id: str
    url: str
    types: tuple[str, ...]
    device_type: str | None
    description: str
    enabled: bool
    status: Status
    created_at: float
    secret: str
    previous_secret: str | None = None  # still signs until previous_until (after a rotation)
    previous_until: float = 0.0
    cursor: str = "0"
    generation: int = 0  # bumped by a replay: a worker's cursor write of an older one is refused
    failing_since: float | None = None  # when the event at the head first failed
    last_error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def wants(self, group: str, device_type: str | None) -> bool:
        return group in self.types and (self.device_type is None or device_type == self.device_type)

    def signing_secrets(self, now: float) -> list[str]:
        if self.previous_secret and now < self.previous_until:
            return [self.secret, self.previous_secret]
        return [self.secret]

    def to_dict(self) -> dict[str, Any]:
        """As the API shows it: never the secret."""
        return {
            "webhook_id": self.webhook_id,
            "url": self.url,
            "types": list(self.types),
            "device_type": self.device_type,
            "description": self.description,
            "enabled": self.enabled,
            "status": self.status,
            "created_at": self.created_at,
            "cursor": self.cursor,
            "failing_since": self.failing_since,
            "last_error": self.last_error,
        }

    def to_hash(self) -> dict[str, str]:
        return {
            "url": self.url,
            "types": ",".join(self.types),
            "device_type": self.device_type or "",
            "description": self.description,
            "enabled": "1" if self.enabled else "0",
            "status": self.status,
            "created_at": repr(self.created_at),
            "secret": self.secret,
            "previous_secret": self.previous_secret or "",
            "previous_until": repr(self.previous_until),
            "cursor": self.cursor,
            "generation": str(self.generation),
            "failing_since": "" if self.failing_since is None else repr(self.failing_since),
            "last_error": self.last_error or "",
        }

    @classmethod
    def from_hash(cls, webhook_id: str, raw: dict[bytes, bytes]) -> Webhook:
        get = {k.decode(): v.decode() for k, v in raw.items()}
        status = get.get("status", "active")
        return cls(
            webhook_id=webhook_id,
            url=get["url"],
            types=tuple(t for t in get.get("types", "").split(",") if t),
            device_type=get.get("device_type") or None,
            description=get.get("description", ""),
            enabled=get.get("enabled") == "1",
            status=status if status in ("active", "failing", "disabled") else "active",  # type: ignore[arg-type]
            created_at=float(get.get("created_at") or 0),
            secret=get["secret"],
            previous_secret=get.get("previous_secret") or None,
            previous_until=float(get.get("previous_until") or 0),
            cursor=get.get("cursor") or "0",
            generation=int(get.get("generation") or 0),
            failing_since=float(get["failing_since"]) if get.get("failing_since") else None,
            last_error=get.get("last_error") or None,
        )

    def changed(self, **changes: Any) -> Webhook:
        return replace(self, **changes)


def check_url(url: str) -> urllib.parse.SplitResult:
    """An absolute http(s) URL with a host and no credentials; TargetRefused otherwise."""
    if len(url) > MAX_URL:
        raise TargetRefused(f"a webhook URL is at most {MAX_URL} characters")
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise TargetRefused(f"not an http(s) URL with a host: {url[:80]!r}")
    if parts.username or parts.password:
        raise TargetRefused("credentials in the URL would be sent to every log; use the path")
    try:
        _ = parts.port
    except ValueError:
        raise TargetRefused(f"the port of {url[:80]!r} is not a number") from None
    return parts


def refused_address(address: str) -> str | None:
    """Why the gateway must not send to *address* unless private targets are allowed: the
    gateway would otherwise be a proxy into its own network (SSRF). None when it may."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    for what, test in (
        ("loopback", ip.is_loopback),
        ("link-local", ip.is_link_local),
        ("private", ip.is_private),
        ("multicast", ip.is_multicast),
        ("unspecified", ip.is_unspecified),
        ("reserved", ip.is_reserved),
    ):
        if test:
            return f"{address} is a {what} address"
    return None


def backoff(attempt: int, base: float, cap: float, rng: random.Random | None = None) -> float:
    """Seconds before retry number *attempt* (1 = the first retry): exponential from *base*,
    at most *cap*, with full jitter over its upper half so retries of many endpoints spread."""
    delay = min(cap, base * 2 ** min(attempt - 1, 62))
    return float(delay * (0.5 + 0.5 * (rng or random).random()))


def gap_body(after: str, first_kept: list[str], now: float) -> bytes:
    """The event sent in place of events trimmed from the log before they were delivered."""
    return orjson.dumps(
        {
            "type": "gap",
            "after": after,
            "first_kept": first_kept,
            "timestamp": now,
            "detail": "events after `after` were trimmed from the fleet log before they could "
            "be delivered; delivery goes on from the oldest event still kept",
        }
    )
