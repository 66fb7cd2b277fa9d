"""Webhooks: the fleet event log pushed to HTTP endpoints, signed as Standard Webhooks.

`verify(secret, headers, body)` is what a Python receiver needs; the rest is the gateway's:
`model` (endpoints and their rules, pure), `signing` (pure), `store` (Redis), `delivery` (the
worker that delivers each event once per endpoint across every gateway process).
"""

from gateway.webhooks.signing import WebhookVerificationError, new_secret, verify

__all__ = ["WebhookVerificationError", "new_secret", "verify"]
