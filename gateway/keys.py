"""Every Redis key, channel and hash-field name, for each data layout; the id rules that keep
them safe. This is the only module that formats a key or names a field of the device hash.

Three layouts, one seam:

- `python` (the default, single node): the names of "How to Implement Device State Management
  with Redis" byte for byte, with its Python classes' hash fields (`device_id`, `last_seen`, …).
- `node` (single node): the same keys, with its Node.js classes' hash fields (`deviceId`,
  `lastSeen` in milliseconds, …), so those classes and the gateway read each other's devices.
- `cluster`: each device belongs to one of `partitions` partitions by a stable hash of its id;
  a partition's keys (its devices' hashes and heartbeats, and its sets, indexes, counters and
  event stream) share one hash tag, so every transition touches one slot and stays one atomic
  script. Tags are chosen so partitions fall evenly over the 16384 slots, hence evenly over
  primaries that split the slots in equal ranges. Channels are sharded (SPUBLISH).

On a single node there is one partition, tagged with nothing: every name is the plain one. A
prefix, when set, goes in front of every name.
"""

from __future__ import annotations

import functools
import re
import zlib
from dataclasses import dataclass
from typing import Literal

from redis.crc import key_slot

ID_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,128}")
TYPE_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,64}")
SESSION_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,64}")
COMMAND_ID_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,64}")
COMMAND_NAME_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,64}")
PREFIX_PATTERN = re.compile(r"[A-Za-z0-9._:-]{0,64}")
SLOTS = 16384
TAG_ALPHABET = "0123456789abcdefghijklmnopqrstuvwxyz"
DEFAULT_PARTITIONS = 64

Schema = Literal["python", "node", "cluster"]
SCHEMAS: tuple[Schema, ...] = ("python", "node", "cluster")


def is_device_id(value: object) -> bool:
    """True when *value* may be a device id: it can never form a foreign key or channel."""
    return isinstance(value, str) and ID_PATTERN.fullmatch(value) is not None


def is_device_type(value: object) -> bool:
    return isinstance(value, str) and TYPE_PATTERN.fullmatch(value) is not None


def is_command_id(value: object) -> bool:
    """True when *value* may be a command id (it becomes part of a key name)."""
    return isinstance(value, str) and COMMAND_ID_PATTERN.fullmatch(value) is not None


@dataclass(frozen=True, slots=True)
class Fields:
    """The device hash's fields that other programs read and write, in one schema's names.

    The gateway's own fields (`version`, `session`, `token_hash`, …) are the same everywhere.
    `millis`: the schema writes `registered_at` and `last_seen` in milliseconds, not seconds.
    """

    device_id: str = "device_id"
    device_type: str = "device_type"
    registered_at: str = "registered_at"
    status: str = "status"
    last_seen: str = "last_seen"
    reported: str = "reported_state"
    desired: str = "desired_state"
    metadata: str = "metadata"
    millis: bool = False

    def section(self, section: str) -> str:
        """The field of a shadow section: `desired`, `reported` or `metadata`."""
        return {"desired": self.desired, "reported": self.reported}.get(section, self.metadata)


PYTHON_FIELDS = Fields()
NODE_FIELDS = Fields(
    device_id="deviceId",
    device_type="deviceType",
    registered_at="registeredAt",
    last_seen="lastSeen",
    reported="reportedState",
    desired="desiredState",
    millis=True,
)


@dataclass(frozen=True, slots=True)
class Partition:
    """The fleet-wide names of one partition (on a single node: of the whole fleet)."""

    number: int
    base: str  # prefix and hash tag: what every name of this partition starts with

    @property
    def online(self) -> str:
        return f"{self.base}devices:online"

    @property
    def registered(self) -> str:
        return f"{self.base}devices:registered"

    def type_set(self, device_type: str) -> str:
        return f"{self.base}devices:type:{device_type}"

    @property
    def presence_channel(self) -> str:
        return f"{self.base}devices:presence"

    @property
    def index(self) -> str:
        return f"{self.base}devices:index"

    @property
    def index_online(self) -> str:
        return f"{self.base}devices:index:online"

    def index_type(self, device_type: str) -> str:
        return f"{self.base}devices:index:type:{device_type}"

    @property
    def offline_seen(self) -> str:
        """Offline devices by last seen (never seen: minus their registration time)."""
        return f"{self.base}devices:offline:seen"

    @property
    def online_seen(self) -> str:
        """Online devices by when their index last moved (at most every few seconds)."""
        return f"{self.base}devices:online:seen"

    @property
    def types(self) -> str:
        return f"{self.base}devices:types"

    @property
    def online_by_type(self) -> str:
        return f"{self.base}devices:stats:online_by_type"

    @property
    def retired_versions(self) -> str:
        return f"{self.base}devices:presence:retired"

    @property
    def events(self) -> str:
        return f"{self.base}devices:events"

    @property
    def control_channel(self) -> str:
        return f"{self.base}gateway:control"

    def probe_channel(self, process: str) -> str:
        """Where one process checks that its subscriptions in this partition still deliver."""
        return f"{self.base}gateway:probe:{process}"

    # --- commands (gateway/commands/) ---------------------------------------------
    @property
    def commands_due(self) -> str:
        """`<device id>/<command id>` of pending commands, by the epoch ms they are due."""
        return f"{self.base}devices:commands:due"

    @property
    def commands_counts(self) -> str:
        """Pending commands by status (queued, sent)."""
        return f"{self.base}devices:commands:counts"

    @property
    def commands_channel(self) -> str:
        """Every command status change, as its fleet-log event."""
        return f"{self.base}devices:commands"

    @property
    def command_keys(self) -> list[str]:
        """The partition's keys every command script takes first, in their order."""
        return [self.commands_due, self.commands_counts, self.events, self.commands_channel]


@dataclass(frozen=True)
class Keys:
    """Names for one layout; see the module docstring."""

    prefix: str = ""
    schema: Schema = "python"
    partitions: int = 1

    def __post_init__(self) -> None:
        if not PREFIX_PATTERN.fullmatch(self.prefix):
            raise ValueError(
                f"a key prefix is up to 64 of A-Z a-z 0-9 . _ : -, got {self.prefix!r}"
            )
        if self.schema != "cluster" and self.partitions != 1:
            raise ValueError("only the cluster layout has more than one partition")
        if not 1 <= self.partitions <= 4096:
            raise ValueError(f"partitions must be 1–4096, got {self.partitions}")

    @property
    def fields(self) -> Fields:
        return NODE_FIELDS if self.schema == "node" else PYTHON_FIELDS

    @classmethod
    def cluster(cls, prefix: str = "", partitions: int = DEFAULT_PARTITIONS) -> Keys:
        return cls(prefix, "cluster", partitions)

    @classmethod
    def single(cls, prefix: str = "", schema: str = "python") -> Keys:
        """The one-node layout with the given schema's field names (`python` or `node`)."""
        if schema not in ("python", "node"):
            raise ValueError(f"schema must be python or node, got {schema!r}")
        return cls(prefix, "node" if schema == "node" else "python")

    @property
    def sharded(self) -> bool:
        """Channels are sharded (SSUBSCRIBE/SPUBLISH): the cluster layout."""
        return self.schema == "cluster"

    @property
    def seed_sets(self) -> bool:
        """The seed document's sets (`devices:registered`, `devices:online`, `devices:type:{t}`)
        are kept: on one node, for its classes. A cluster does without (they cannot run there),
        and its lists and counts come from the gateway's own indexes either way."""
        return self.schema != "cluster"

    # --- partitions -----------------------------------------------------------
    def partition(self, device_id: str) -> int:
        """The device's partition: a stable hash of its id (part of the data layout)."""
        if self.partitions == 1:
            return 0
        return zlib.crc32(device_id.encode()) % self.partitions

    @functools.cached_property
    def parts(self) -> tuple[Partition, ...]:
        if self.schema != "cluster":
            return (Partition(0, self.prefix),)
        return tuple(
            Partition(number, f"{self.prefix}{{{tag}}}")
            for number, tag in enumerate(spread_tags(self.partitions))
        )

    def part(self, number: int) -> Partition:
        return self.parts[number]

    def of(self, device_id: str) -> Partition:
        """The partition that holds *device_id*."""
        return self.parts[self.partition(device_id)]

    # --- one device's names -----------------------------------------------------
    def state(self, device_id: str) -> str:
        return f"{self.of(device_id).base}device:state:{device_id}"

    def heartbeat(self, device_id: str) -> str:
        return f"{self.of(device_id).base}device:heartbeat:{device_id}"

    def history(self, device_id: str) -> str:
        return f"{self.of(device_id).base}device:history:{device_id}"

    def commands(self, device_id: str) -> str:
        return f"{self.of(device_id).base}device:{device_id}:commands"

    def command(self, device_id: str, command_id: str) -> str:
        """One command's record (a hash)."""
        return self.command_base(device_id) + command_id

    def command_base(self, device_id: str) -> str:
        """A command key without its command id: scripts that walk a device's commands append
        the ids (every such key shares the device's hash tag, so the device's slot)."""
        return f"{self.of(device_id).base}device:command:{device_id}:"

    def commands_pending(self, device_id: str) -> str:
        """The device's commands not final yet, by their order (a zset)."""
        return f"{self.of(device_id).base}device:commands:pending:{device_id}"

    def commands_done(self, device_id: str) -> str:
        """The device's final commands still kept, by their order (a zset, bounded)."""
        return f"{self.of(device_id).base}device:commands:done:{device_id}"

    # --- names read back --------------------------------------------------------
    def device_from_heartbeat(self, key: str) -> str | None:
        """The id in a heartbeat key (from a keyspace notification), if it is one of ours."""
        return self._read_back(key, "device:heartbeat:", "")

    def device_from_commands(self, channel: str) -> str | None:
        return self._read_back(channel, "device:", ":commands")

    def _read_back(self, name: str, head: str, tail: str) -> str | None:
        if not name.startswith(self.prefix):
            return None
        rest = name[len(self.prefix) :]
        if self.schema == "cluster":
            tag, brace, rest = rest.partition("}")
            if not brace or not tag.startswith("{"):
                return None
        if not (rest.startswith(head) and rest.endswith(tail)):
            return None
        device_id = rest[len(head) : len(rest) - len(tail)]
        if not is_device_id(device_id) or self.of(device_id).base + head + device_id + tail != name:
            return None
        return device_id

    # --- the fleet-counts series (timeseries.py) ---------------------------------
    def fleet_series(self, tier: str) -> str:
        """One tier of the fleet-counts time series (a sorted set scored by time)."""
        return f"{self._fleet_base}gateway:fleet:{tier}"

    def fleet_claim(self, step: int) -> str:
        """Claimed (`SET NX PX`) by the one process that samples step number *step*."""
        return f"{self._fleet_base}gateway:fleet:claim:{step}"

    @property
    def _fleet_base(self) -> str:
        # on a cluster the series' names share a tag of their own: one slot, and no partition's
        return f"{self.prefix}{{fleet}}" if self.schema == "cluster" else self.prefix

    @staticmethod
    def expired_channel(db: int) -> str:
        """Keyspace `expired` events of database *db* (the URL's database, never assumed 0)."""
        return f"__keyevent@{db}__:expired"

    # --- the single-node names, for code that runs only there -------------------
    @property
    def online(self) -> str:
        return self._single().online

    @property
    def registered(self) -> str:
        return self._single().registered

    @property
    def presence_channel(self) -> str:
        return self._single().presence_channel

    def type_set(self, device_type: str) -> str:
        return self._single().type_set(device_type)

    def _single(self) -> Partition:
        if self.partitions != 1:
            raise ValueError("a fleet-wide name needs a partition on the cluster layout")
        return self.parts[0]


def generated_admin_key(keys: Keys) -> str:
    """Hash of the admin key generated at first start when none is configured."""
    return f"{keys.prefix}gateway:generated_admin_key"


def login_session(keys: Keys, session_hash: str) -> str:
    """A dashboard login session, by the hash of its cookie value."""
    return f"{keys.prefix}gateway:login:{session_hash}"


@functools.cache
def spread_tags(count: int) -> tuple[str, ...]:
    """One short hash tag per partition, partition i's in the i-th of *count* equal slot ranges.

    `valkey-cli --cluster create` and managed clusters give primaries equal, contiguous slot
    ranges, so partitions spread evenly over any number of primaries that divides them well
    (naive tags like `0`…`63` hash to arbitrary slots and pile up on some primaries).
    """
    tags: list[str | None] = [None] * count
    missing = count
    for tag in _candidate_tags():
        slot = key_slot(tag.encode())
        index = slot * count // SLOTS
        if tags[index] is None:
            tags[index] = tag
            missing -= 1
            if missing == 0:
                return tuple(t for t in tags if t is not None)
    raise AssertionError("the candidate tags ran out")  # pragma: no cover - 46,656 of 3 chars


def _candidate_tags() -> list[str]:
    """Shortest first, in a fixed order: the same count always gives the same tags."""
    one = list(TAG_ALPHABET)
    two = [a + b for a in TAG_ALPHABET for b in TAG_ALPHABET]
    three = [a + b for a in TAG_ALPHABET for b in two]
    return one + two + three


# --- the stored layout and the gateway's own hash fields ---------------------------------
@dataclass(frozen=True, slots=True)
class OwnFields:
    """The gateway's own fields of the device hash (beside the layout's `Fields`).

    Names are short: a device hash is a compact listpack searched from its start, and every
    byte of a field name is paid once per device. No other program reads them.
    """

    version: str = "v"
    desired_version: str = "dv"
    reported_version: str = "rv"
    presence_version: str = "pv"
    desired_sha: str = "ds"
    reported_meta: str = "rm"
    desired_meta: str = "dm"
    session: str = "sn"
    token_hash: str = "th"
    linger_reason: str = "lr"


OWN_FIELDS = OwnFields()
# the names the previous release wrote (stored layout 1), read only by `gateway migrate`
LAYOUT1_OWN_FIELDS = OwnFields(
    version="version",
    desired_version="desired_version",
    reported_version="reported_version",
    presence_version="presence_version",
    desired_sha="desired_sha",
    reported_meta="reported_meta",
    desired_meta="desired_meta",
    session="session",
    token_hash="token_hash",
    linger_reason="linger_reason",
)


def layout_version(keys: Keys) -> str:
    """The stored layout's version: one small string per deployment (prefix) and cluster;
    on a cluster under a tag of its own, like the fleet series."""
    return f"{keys._fleet_base}gateway:layout"


def layout_migration(keys: Keys) -> str:
    """A hash of a running `gateway migrate --apply`: where each node's scan got to."""
    return f"{keys._fleet_base}gateway:layout:migration"


def device_key_patterns(keys: Keys) -> dict[str, str]:
    """SCAN patterns of each kind of per-device key (any partition), by kind."""
    tag = "{*}" if keys.sharded else ""
    return {
        "state": f"{_glob(keys.prefix)}{tag}device:state:*",
        "history": f"{_glob(keys.prefix)}{tag}device:history:*",
    }


def device_of_key(keys: Keys, kind: str, name: str) -> str | None:
    """The device id in a per-device key of *kind* (`state`, `history`) found by SCAN, if it
    is one of this layout's names (a partition's tag must match the id's)."""
    return keys._read_back(name, f"device:{kind}:", "")


def _glob(text: str) -> str:
    """*text* matched literally by a SCAN pattern (a prefix may hold none of `*?[]\\`, but
    escape them anyway)."""
    return re.sub(r"([*?\[\]\\])", r"\\\1", text)


# --- webhooks (gateway/webhooks/) ---------------------------------------------------
def webhooks_index(keys: Keys) -> str:
    """The set of every webhook endpoint's id."""
    return f"{keys.prefix}gateway:webhooks"


def _webhook_base(keys: Keys, webhook_id: str) -> str:
    # on a cluster an endpoint's keys share a tag of their own: its scripts stay in one slot
    tag = f"{{{webhook_id}}}" if keys.schema == "cluster" else ""
    return f"{keys.prefix}{tag}gateway:webhook:{webhook_id}"


def webhook(keys: Keys, webhook_id: str) -> str:
    """A webhook endpoint (a hash): its settings, secret, cursor and status."""
    return _webhook_base(keys, webhook_id)


def webhook_lease(keys: Keys, webhook_id: str) -> str:
    """Held (`SET NX PX`, renewed) by the one process delivering to the endpoint; its value
    is that process's token, which fences every cursor write."""
    return _webhook_base(keys, webhook_id) + ":lease"


def webhook_deliveries(keys: Keys, webhook_id: str) -> str:
    """The endpoint's recent delivery attempts (a list, newest first, bounded)."""
    return _webhook_base(keys, webhook_id) + ":deliveries"
