"""Problems: every error a client can get, in one table (RFC 9457 problem details).

The edge raises `Problem`; the store and the shadow rules raise their own errors
(`errors.GatewayError`, `shadow.ShadowError`), each naming its kind, and `from_error` turns
them into problems. The API answers either as `application/problem+json` with a stable `type`
and `title`.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from gateway import shadow
from gateway.errors import GatewayError

TYPE_BASE = "https://presence-gateway.dev/problems/"


class Kind(NamedTuple):
    status: int
    title: str


KINDS: dict[str, Kind] = {
    "invalid-json": Kind(400, "Body is not valid JSON"),
    "invalid-request": Kind(422, "Request is not valid"),
    "invalid-device-id": Kind(422, "Device id is not valid"),
    "invalid-device-type": Kind(422, "Device type is not valid"),
    "invalid-cursor": Kind(400, "Cursor is not valid"),
    "invalid-state": Kind(422, "State document is not valid"),
    "invalid-state-key": Kind(422, "State key is not valid"),
    "state-too-large": Kind(413, "State document is too large"),
    "state-too-deep": Kind(422, "State document nests too deeply"),
    "body-too-large": Kind(413, "Request body is too large"),
    "unsupported-media-type": Kind(415, "Body must be application/json"),
    "unauthorized": Kind(401, "Missing or unknown API key"),
    "forbidden": Kind(403, "This API key may not do that"),
    "device-not-found": Kind(404, "Device not found"),
    "not-found": Kind(404, "Not found"),
    "method-not-allowed": Kind(405, "Method not allowed"),
    "device-exists": Kind(409, "Device already exists"),
    "version-conflict": Kind(409, "Shadow version conflict"),
    "command-not-found": Kind(404, "Command not found"),
    "command-finished": Kind(409, "Command already finished"),
    "command-exists": Kind(409, "Command id already used"),
    "device-offline": Kind(409, "Device not connected"),
    "command-queue-full": Kind(429, "Command queue full"),
    "write-contention": Kind(503, "Shadow kept changing; try again"),
    "redis-unavailable": Kind(503, "Redis is unavailable"),
    "internal-error": Kind(500, "Internal error"),
    "too-many-streams": Kind(503, "Too many event streams on this gateway"),
    "webhook-not-found": Kind(404, "Webhook not found"),
    "webhook-target-refused": Kind(422, "Webhook target refused"),
    "too-many-webhooks": Kind(409, "Too many webhooks"),
}


class Problem(Exception):
    """An error with a problem kind from KINDS and a human-readable detail."""

    def __init__(self, kind: str, detail: str, **extra: Any) -> None:
        if kind not in KINDS:  # pragma: no cover - a programming error
            raise KeyError(kind)
        super().__init__(detail)
        self.kind = kind
        self.detail = detail
        self.extra = extra

    @property
    def status(self) -> int:
        return KINDS[self.kind].status

    def body(self, instance: str | None = None) -> dict[str, Any]:
        document: dict[str, Any] = {
            "type": TYPE_BASE + self.kind,
            "title": KINDS[self.kind].title,
            "status": self.status,
            "detail": self.detail,
        }
        if instance:
            document["instance"] = instance
        document.update(self.extra)
        return document


def from_error(error: GatewayError | shadow.ShadowError) -> Problem:
    """A domain error as the problem the edge answers with, its members kept."""
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
    if isinstance(error, shadow.ShadowError):
        return Problem(error.problem, error.detail, **({"path": error.path} if error.path else {}))
    return Problem(error.problem, error.detail, **error.extra)
