"""Every Redis key and channel name, and the id rules that keep them safe.

This is the only module that formats a key. The seed document's names hold as written
when no prefix is configured; a prefix, when set, goes in front of every name.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

ID_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,128}")
TYPE_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,64}")
SESSION_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,64}")


def is_device_id(value: object) -> bool:
    """True when *value* may be a device id (contract §1): it can never form a foreign key."""
    return isinstance(value, str) and ID_PATTERN.fullmatch(value) is not None


def is_device_type(value: object) -> bool:
    return isinstance(value, str) and TYPE_PATTERN.fullmatch(value) is not None


@dataclass(frozen=True, slots=True)
class Keys:
    """Key and channel names under an optional namespace prefix."""

    prefix: str = ""

    # --- the seed's names -------------------------------------------------
    def state(self, device_id: str) -> str:
        return f"{self.prefix}device:state:{device_id}"

    def heartbeat(self, device_id: str) -> str:
        return f"{self.prefix}device:heartbeat:{device_id}"

    @property
    def heartbeat_prefix(self) -> str:
        return f"{self.prefix}device:heartbeat:"

    @property
    def online(self) -> str:
        return f"{self.prefix}devices:online"

    @property
    def registered(self) -> str:
        return f"{self.prefix}devices:registered"

    def type_set(self, device_type: str) -> str:
        return f"{self.prefix}devices:type:{device_type}"

    @property
    def presence_channel(self) -> str:
        return f"{self.prefix}devices:presence"

    def commands(self, device_id: str) -> str:
        return f"{self.prefix}device:{device_id}:commands"

    def device_from_commands(self, channel: str) -> str | None:
        head, tail = f"{self.prefix}device:", ":commands"
        if channel.startswith(head) and channel.endswith(tail):
            device_id = channel[len(head) : -len(tail)]
            return device_id if is_device_id(device_id) else None
        return None

    # --- the gateway's own ------------------------------------------------
    @property
    def index(self) -> str:
        return f"{self.prefix}devices:index"

    @property
    def index_online(self) -> str:
        return f"{self.prefix}devices:index:online"

    def index_type(self, device_type: str) -> str:
        return f"{self.prefix}devices:index:type:{device_type}"

    @property
    def seen(self) -> str:
        return f"{self.prefix}devices:seen"

    @property
    def online_seen(self) -> str:
        return f"{self.prefix}devices:online:seen"

    @property
    def types(self) -> str:
        return f"{self.prefix}devices:types"

    @property
    def online_by_type(self) -> str:
        return f"{self.prefix}devices:stats:online_by_type"

    @property
    def retired_versions(self) -> str:
        return f"{self.prefix}devices:presence:retired"

    def history(self, device_id: str) -> str:
        return f"{self.prefix}device:history:{device_id}"

    @property
    def events(self) -> str:
        return f"{self.prefix}devices:events"

    @property
    def control_channel(self) -> str:
        return f"{self.prefix}gateway:control"

    def expired_channel(self, db: int) -> str:
        """Keyspace `expired` events of database *db* (the URL's database, never assumed 0)."""
        return f"__keyevent@{db}__:expired"

    def device_from_heartbeat(self, key: str) -> str | None:
        head = self.heartbeat_prefix
        if key.startswith(head):
            device_id = key[len(head) :]
            return device_id if is_device_id(device_id) else None
        return None


def generated_admin_key(keys: Keys) -> str:
    """Hash of the admin key generated at first start when none is configured."""
    return f"{keys.prefix}gateway:generated_admin_key"


def login_session(keys: Keys, session_hash: str) -> str:
    """A dashboard login session, by the hash of its cookie value."""
    return f"{keys.prefix}gateway:login:{session_hash}"
