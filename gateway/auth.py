"""Credentials: API keys with roles, and device tokens stored only as hashes."""

from __future__ import annotations

import base64
import enum
import hashlib
import hmac
import secrets
from collections.abc import Iterable
from dataclasses import dataclass


class Role(enum.Enum):
    ADMIN = "admin"
    READ = "read"


def new_secret() -> str:
    """A 256-bit random token, URL-safe: device tokens and generated API keys."""
    return secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    """SHA-256 of a token. Tokens carry 256 random bits, so a fast hash is enough."""
    return hashlib.sha256(token.encode()).hexdigest()


def hash_device_token(token: str) -> str:
    """A device token's hash as its device hash keeps it: the first 128 bits of its SHA-256,
    base64url (22 characters, a third of the hex digest: one of a million device hashes).
    Finding a token for it still takes 2^128 tries."""
    digest = hashlib.sha256(token.encode()).digest()[:16]
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def token_matches(stored_hash: str | bytes | None, token: str) -> bool:
    """Constant-time check of *token* against a stored device token hash (either form: the
    whole hex SHA-256 of earlier builds is still read); no hash means no token works."""
    if not stored_hash:
        return False
    expected = stored_hash.decode() if isinstance(stored_hash, bytes) else stored_hash
    found = hash_token(token) if len(expected) == 64 else hash_device_token(token)
    return hmac.compare_digest(found, expected)


@dataclass(frozen=True)
class ApiKeys:
    """The configured API keys, kept as hashes so a key never sits in memory longer than needed."""

    admin: frozenset[str]
    read: frozenset[str]

    @classmethod
    def of(cls, admin: Iterable[str], read: Iterable[str]) -> ApiKeys:
        return cls(frozenset(map(hash_token, admin)), frozenset(map(hash_token, read)))

    def role(self, presented: str | None) -> Role | None:
        if not presented:
            return None
        digest = hash_token(presented)
        # compare against every key so timing does not tell which set matched
        is_admin = any(hmac.compare_digest(digest, key) for key in self.admin)
        is_read = any(hmac.compare_digest(digest, key) for key in self.read)
        if is_admin:
            return Role.ADMIN
        return Role.READ if is_read else None


def bearer(header: str | None) -> str | None:
    """The token of an `Authorization: Bearer …` header."""
    if not header:
        return None
    scheme, _, value = header.partition(" ")
    return value.strip() or None if scheme.lower() == "bearer" else None
