"""The REST contract, declared once: every name, request and response body, query and reply.

Each declaration is a msgspec `Struct` or an annotated type. `gateway.validation` checks requests
against them (and explains a refusal in their words); `gateway.openapi` builds `/openapi.json`
from them and from the route table. Neither restates a limit, a pattern or a field.

`Meta(extra=...)` names a refusal where the default `invalid-request` would be too vague, and
puts a pattern into words:

- `problem`: the problem kind for a value of the right JSON type that breaks a limit;
- `type_problem`: the problem kind for a value of the wrong JSON type;
- `also`: kinds the store may still raise about an accepted value (documented, not checked here);
- `expected`: what a pattern means, for refusals ("1–128 characters of ...").
"""

from __future__ import annotations

import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from msgspec import UNSET, Meta, Struct, UnsetType
from msgspec import field as msgspec_field

from gateway import keys
from gateway.commands import model as commands_model
from gateway.store import MAX_PAGE

MAX_BODY_BYTES = 256 * 1024
MAX_HISTORY_PAGE = 500
DEFAULT_PAGE = 100
DEFAULT_HISTORY_PAGE = 50
MAX_CURSOR_LENGTH = 1024
MAX_POSITION_LENGTH = 2048
MAX_COMMAND_PAGE = 100
DEFAULT_COMMAND_PAGE = 50
NAME_CHARACTERS = "A-Z a-z 0-9 . _ -"


END = r"$(?!\n)"  # the end of the text, not the end before a final newline


def _whole(pattern: re.Pattern[str]) -> str:
    """A keys.py pattern (matched whole there) anchored for msgspec and JSON Schema, which search.

    `(?!\\n)`: Python's `$` also matches before a final newline ("id\\n"); both Python and
    JSON Schema's regexes read the lookahead the same way.
    """
    return f"^{pattern.pattern}{END}"


def _text(pattern: str, expected: str, **extra: Any) -> Meta:
    """A string pattern, with the words that explain it in documents and in refusals."""
    return Meta(pattern=pattern, description=expected, extra={"expected": expected, **extra})


# --- names and values ------------------------------------------------------------
DeviceId = Annotated[
    str,
    _text(
        _whole(keys.ID_PATTERN),
        f"1–128 characters of {NAME_CHARACTERS}",
        problem="invalid-device-id",
    ),
]
DeviceType = Annotated[
    str, _text(_whole(keys.TYPE_PATTERN), f"1–64 characters of {NAME_CHARACTERS}")
]
# an event's id in the fleet log: its stream id, after its partition on a cluster (eventlog.py)
EventId = Annotated[
    str,
    _text(
        "^([0-9]{1,4}:)?[0-9]{1,20}(-[0-9]{1,20})?" + END,
        "an event id: a stream id like 1700000000000-0 (on a cluster, after its partition: "
        "2:1700000000000-0)",
        also=("invalid-cursor",),
    ),
]
# Opaque on purpose: on a cluster one position covers every partition's stream.
Position = Annotated[
    str,
    _text(
        f"^[A-Za-z0-9_.:-]{{1,{MAX_POSITION_LENGTH}}}{END}",
        f"an opaque position: 1–{MAX_POSITION_LENGTH} characters of A-Z a-z 0-9 _ - . :",
        also=("invalid-cursor",),
    ),
]
Cursor = Annotated[
    str,
    Meta(
        max_length=MAX_CURSOR_LENGTH,
        description="`next_cursor` of the previous page, as it came; empty starts over",
        extra={"problem": "invalid-cursor"},
    ),
]
Document = Annotated[
    dict[str, Any],
    Meta(
        description="A JSON object (a state section or metadata)",
        extra={
            "type_problem": "invalid-state",
            "also": ("invalid-state-key", "state-too-deep", "state-too-large"),
        },
    ),
]
Delta = Annotated[
    dict[str, dict[str, Any]],
    Meta(
        description="Every desired leaf that reported does not match, keyed by its path from "
        "the root: a leaf is `{desired, reported}` (reported null when absent), an inner node "
        "is another Delta"
    ),
]
Presence = Literal["online", "offline"]
Version = Annotated[int, Meta(ge=0)]
Count = Annotated[int, Meta(ge=0)]
Seconds = Annotated[float, Meta(description="Epoch seconds")]
Token = Annotated[str, Meta(min_length=1, description="The device token; shown only here")]


# --- request bodies ----------------------------------------------------------------
class RegisterRequest(Struct, forbid_unknown_fields=True):
    """A device to register."""

    device_id: DeviceId
    device_type: Annotated[DeviceType, Meta(extra={"problem": "invalid-device-type"})]
    metadata: Annotated[Document, Meta(description="Stored as given; null values dropped")] = {}


class MetadataPatch(Struct, forbid_unknown_fields=True):
    """A merge into the device's metadata."""

    metadata: Annotated[Document, Meta(description="Merged into metadata; null deletes a key")]


class DesiredPatch(Struct, forbid_unknown_fields=True):
    """A merge into the desired state, with optional preconditions."""

    state: Annotated[
        Document,
        Meta(
            description="Merged into the desired state: null deletes a key, nested objects "
            "merge, arrays replace"
        ),
    ]
    version: Annotated[
        Version | None,
        Meta(
            description="Write only if the shadow (desired and reported) is still at this version"
        ),
    ] = None
    desired_version: Annotated[
        Version | None,
        Meta(
            description="Write only if the desired state is still at this version; the "
            "device's own reports never make it stale"
        ),
    ] = None


class LoginRequest(Struct, forbid_unknown_fields=True):
    """An API key to exchange for a session cookie."""

    api_key: Annotated[
        str,
        Meta(description="An API key; empty means the one in the Authorization header"),
    ]


# --- path and query parameters -------------------------------------------------------
# Absent optional parameters are UNSET, never None: msgspec reads the text "null" as None for
# an optional field, and `?status=null` must be refused, not taken as "no filter".
class DeviceQuery(Struct, forbid_unknown_fields=True):
    status: Annotated[Presence, Meta(description="Only devices with this presence")] | UnsetType = (
        UNSET
    )
    type: Annotated[DeviceType, Meta(description="Only devices of this type")] | UnsetType = UNSET
    stale_seconds: (
        Annotated[
            float,
            Meta(
                ge=0,
                le=sys.float_info.max,  # finite: "inf" is no number of seconds
                description="Only devices not seen for at least this many seconds",
                extra={"expected": "a number ≥ 0 (seconds)"},
            ),
        ]
        | UnsetType
    ) = UNSET
    include_state: Annotated[
        bool, Meta(description="Add metadata, reported_state and desired_state to each item")
    ] = False
    limit: Annotated[
        int, Meta(ge=1, le=MAX_PAGE, description="Largest number of items on the page")
    ] = DEFAULT_PAGE
    cursor: Cursor | UnsetType = UNSET
    prefix: (
        Annotated[
            str,
            Meta(
                pattern=_whole(keys.ID_PATTERN),
                description="Only devices whose id starts with this (case-sensitive); "
                "not with stale_seconds",
                extra={"expected": f"1–128 characters of {NAME_CHARACTERS}"},
            ),
        ]
        | UnsetType
    ) = UNSET


class HistoryQuery(Struct, forbid_unknown_fields=True):
    limit: Annotated[
        int,
        Meta(ge=1, le=MAX_HISTORY_PAGE, description="Largest number of events on the page"),
    ] = DEFAULT_HISTORY_PAGE
    before: (
        Annotated[EventId, Meta(description="`next_before` of the previous page")] | UnsetType
    ) = UNSET


class EventsQuery(Struct, forbid_unknown_fields=True):
    after: Annotated[
        Position,
        Meta(description="Return events after this position: `last_id` of the previous call"),
    ] = "0-0"
    limit: Annotated[
        int, Meta(ge=1, le=MAX_PAGE, description="Largest number of fleet events to read")
    ] = DEFAULT_PAGE


class LatestQuery(Struct, forbid_unknown_fields=True):
    upto: (
        Annotated[
            Position,
            Meta(
                description="Return events at or before this position: a dashboard snapshot's "
                "or events frame's `cursor`, or `next_upto` of the previous page; default: the "
                "newest event"
            ),
        ]
        | UnsetType
    ) = UNSET
    limit: Annotated[
        int, Meta(ge=1, le=MAX_PAGE, description="Largest number of presence events returned")
    ] = DEFAULT_PAGE


class FleetHistoryQuery(Struct, forbid_unknown_fields=True):
    range: Annotated[
        Literal["hour", "day", "week"],
        Meta(
            description="hour: a point every sample interval (10 s by default); day: every 6; "
            "week: every 60"
        ),
    ] = "hour"


# --- responses -------------------------------------------------------------------
class DeviceSummary(Struct, forbid_unknown_fields=True):
    """A device as a page lists it."""

    device_id: DeviceId
    device_type: DeviceType
    status: Presence
    last_seen: Annotated[float, Meta(description="Epoch seconds; 0 when never seen")]
    version: Annotated[
        Version, Meta(description="Shadow version: moves with every desired or reported change")
    ]


class PageItem(DeviceSummary):
    """A device as a page lists it; with `include_state`, its documents too."""

    metadata: Document | UnsetType = UNSET
    reported_state: Document | UnsetType = UNSET
    desired_state: Document | UnsetType = UNSET


class ShadowMetadata(Struct, forbid_unknown_fields=True):
    """Per-leaf update timestamps of each section."""

    desired: Document
    reported: Document


class Device(DeviceSummary):
    """A device and its shadow."""

    desired_version: Annotated[Version, Meta(description="Moves with every desired change")]
    reported_version: Annotated[Version, Meta(description="Moves with every reported change")]
    registered_at: Seconds
    presence_version: Annotated[Version, Meta(description="Moves with every presence change")]
    metadata: Document
    reported_state: Document
    desired_state: Document
    delta: Delta
    shadow_metadata: ShadowMetadata
    transport: Annotated[
        Literal["websocket", "mqtt"] | None,
        Meta(description="How the device is connected now; null when it is not"),
    ]


class RegisteredDevice(Device):
    """A device just registered, with its first token."""

    token: Token


class DevicePage(Struct, forbid_unknown_fields=True):
    """One page of devices."""

    items: list[PageItem]
    next_cursor: Annotated[
        str | None, Meta(description="Pass as `cursor` for the next page; null at the end")
    ]


class DesiredResult(Struct, forbid_unknown_fields=True):
    """The desired state after a merge, with the versions the write left."""

    device_id: DeviceId
    version: Version
    desired_version: Version
    reported_version: Version
    desired_state: Document
    delta: Delta


class DeltaResult(Struct, forbid_unknown_fields=True):
    """Where reported differs from desired."""

    device_id: DeviceId
    in_sync: bool
    delta: Delta
    version: Version


class Event(Struct, tag_field="type"):
    """A change recorded in a stream; more members may be added."""

    id: Annotated[EventId, Meta(description="Event id in the fleet log")]
    device_id: DeviceId
    timestamp: Seconds


class PresenceEvent(Event, tag="presence"):
    status: Presence
    version: (
        Annotated[int, Meta(ge=1, description="Per-device presence version; only increases")]
        | UnsetType
    ) = UNSET
    reason: (
        Annotated[str, Meta(description="connected, closed, connection_lost, expired, …")]
        | UnsetType
    ) = UNSET


class StateEvent(Event, tag="state"):
    section: Literal["desired", "reported"]
    version: Annotated[int, Meta(ge=1)]
    state: Document
    external: (
        Annotated[bool, Meta(description="True when another program wrote the section to Redis")]
        | UnsetType
    ) = UNSET


class MetadataEvent(Event, tag="metadata"):
    metadata: Document


class HistoryPage(Struct, forbid_unknown_fields=True):
    """A device's changes, newest first."""

    items: list[PresenceEvent | StateEvent | MetadataEvent]
    next_before: Annotated[
        EventId | None, Meta(description="Pass as `before` for older events; null at the end")
    ]


class PresenceEvents(Struct, forbid_unknown_fields=True):
    """Presence events after a position, oldest first."""

    items: list[PresenceEvent]
    last_id: Annotated[Position, Meta(description="Pass as `after` to continue")]
    gap: Annotated[bool, Meta(description="True when events after `after` were already trimmed")]


class LatestPresenceEvents(Struct, forbid_unknown_fields=True):
    """Presence events at or before a position, newest first."""

    items: list[PresenceEvent]
    next_upto: Annotated[
        Position | None,
        Meta(description="Pass as `upto` for older events; null when none are left"),
    ]


class TypeCounts(Struct, forbid_unknown_fields=True):
    registered: Count
    online: Count


class OtherTypes(TypeCounts):
    """The types past the largest sixteen, summed."""

    types: Count


class FleetPoint(Struct, forbid_unknown_fields=True):
    """The fleet's counts at one time."""

    t: Seconds
    registered: Count
    online: Count
    online_min: Annotated[Count, Meta(description="Lowest online count since the last point")]
    online_max: Annotated[Count, Meta(description="Highest online count since the last point")]
    by_type: Annotated[dict[DeviceType, TypeCounts], Meta(description="The largest sixteen types")]
    others: OtherTypes | UnsetType = UNSET


class FleetHistory(Struct, forbid_unknown_fields=True):
    """The fleet's counts over time, oldest first; a missing point is a gap."""

    range: Literal["hour", "day", "week"]
    step: Annotated[int, Meta(ge=1, description="Seconds between two points")]
    span: Annotated[int, Meta(ge=1, description="Seconds the range covers")]
    points: list[FleetPoint]


class Counts(Struct, forbid_unknown_fields=True):
    registered: Count
    online: Count
    offline: Count


class Stats(Counts):
    """Counts of the fleet, and per device type."""

    by_type: dict[DeviceType, Counts]


class TokenResult(Struct, forbid_unknown_fields=True):
    """A new device token, shown only here."""

    device_id: DeviceId
    token: Token


class Session(Struct, forbid_unknown_fields=True):
    """What the credential of the request may do."""

    role: Annotated[
        Literal["admin", "read"],
        Meta(description="admin: reads and writes; read: reads only"),
    ]


class Health(Struct, forbid_unknown_fields=True):
    status: Literal["ok"]


class Readiness(Struct, forbid_unknown_fields=True):
    status: Literal["ready", "starting", "unavailable"]
    redis: Annotated[str, Meta(description="Why Redis did not answer")] | UnsetType = UNSET


class Problem(Struct):
    """RFC 9457 problem details; more members may be added."""

    type: Annotated[str, Meta(extra_json_schema={"format": "uri"})]
    title: str
    status: Annotated[int, Meta(ge=400, le=599)]
    detail: str
    instance: str | UnsetType = UNSET
    parameter: (
        Annotated[str, Meta(description="The field or query parameter at fault")] | UnsetType
    ) = UNSET
    path: Annotated[str, Meta(description="The state key at fault")] | UnsetType = UNSET
    expected_version: Version | UnsetType = UNSET
    expected_desired_version: Version | UnsetType = UNSET
    current_version: Version | UnsetType = UNSET
    current_desired_version: Version | UnsetType = UNSET
    current_reported_version: Version | UnsetType = UNSET


# --- commands (gateway/commands/) ----------------------------------------------------
CommandName = Annotated[
    str, _text(_whole(keys.COMMAND_NAME_PATTERN), f"1–64 characters of {NAME_CHARACTERS}")
]
CommandId = Annotated[
    str, _text(_whole(keys.COMMAND_ID_PATTERN), f"1–64 characters of {NAME_CHARACTERS}")
]
CommandStatus = Literal["queued", "sent", "succeeded", "failed", "timed_out", "expired", "canceled"]
Params = Annotated[
    dict[str, Any],
    Meta(
        description="A JSON object, within a state document's size and depth bounds",
        extra={
            "type_problem": "invalid-state",
            "also": ("invalid-state-key", "state-too-deep", "state-too-large"),
        },
    ),
]


class CommandRequest(Struct, forbid_unknown_fields=True):
    """A command for a device."""

    name: Annotated[CommandName, Meta(description="What the device should do, e.g. reboot")]
    params: Annotated[Params, Meta(description="Its arguments")] = {}
    timeout: Annotated[
        float,
        Meta(
            ge=commands_model.MIN_TIMEOUT,
            le=commands_model.MAX_TIMEOUT,
            description="Seconds the device has to answer once the command was sent to it "
            "(each time it is sent)",
            extra={"expected": "0.1–3600 seconds"},
        ),
    ] = commands_model.DEFAULT_TIMEOUT
    ttl: Annotated[
        float,
        Meta(
            ge=0,
            le=commands_model.MAX_TTL,
            description="Seconds from now the command may wait for the device to connect and "
            "be sent again after a dropped session; 0: only if the device is connected now "
            "(else 409 device-offline, nothing stored)",
            extra={"expected": "0–604800 seconds (7 days)"},
        ),
    ] = commands_model.DEFAULT_TTL
    command_id: (
        Annotated[
            CommandId,
            Meta(
                description="Your own id for it: a repeated request with the same id and "
                "content answers the command it made instead of making another (safe retries)"
            ),
        ]
        | UnsetType
    ) = UNSET


class CommandWait(Struct, forbid_unknown_fields=True):
    wait: Annotated[
        float,
        Meta(
            ge=0,
            le=commands_model.MAX_WAIT,
            description="Seconds to wait for the final status: 200 with it when it comes in "
            "time, else 202",
            extra={"expected": "0–60 seconds"},
        ),
    ] = 0.0


class CommandQuery(Struct, forbid_unknown_fields=True):
    status: Annotated[
        Literal["pending", "done", "all"],
        Meta(description="pending: queued or sent; done: final; all: both"),
    ] = "all"
    limit: Annotated[
        int,
        Meta(ge=1, le=MAX_COMMAND_PAGE, description="Largest number of commands on the page"),
    ] = DEFAULT_COMMAND_PAGE
    cursor: Cursor | UnsetType = UNSET


class Command(Struct, forbid_unknown_fields=True):
    """A command and where it stands."""

    command_id: CommandId
    name: CommandName
    params: Params
    status: Annotated[
        CommandStatus,
        Meta(
            description="queued (waiting for the device) → sent → succeeded | failed (the "
            "device said so), or timed_out (sent, no answer in time), expired (never sent "
            "within its ttl), canceled; a final status never changes again"
        ),
    ]
    created_at: Seconds
    sent_at: Annotated[Seconds | None, Meta(description="When it was last sent")]
    completed_at: Annotated[Seconds | None, Meta(description="When it became final")]
    attempts: Annotated[Count, Meta(description="How many times it was sent")]
    result: Annotated[Params | None, Meta(description="What the device answered")]
    error: Annotated[str | None, Meta(description="Why it failed, timed out or expired")]
    timeout: Annotated[float, Meta(description="Seconds the device has to answer each send")]
    ttl: Annotated[float, Meta(description="Seconds it may wait to be sent, from created_at")]
    expires_at: Annotated[Seconds, Meta(description="created_at + ttl")]
    deadline: Annotated[
        Seconds | None, Meta(description="When the answer to the latest send is due")
    ]


class CommandPage(Struct, forbid_unknown_fields=True):
    """A device's commands, newest first."""

    items: list[Command]
    next_cursor: Annotated[
        str | None, Meta(description="Pass as `cursor` for the next page; null at the end")
    ]


# --- operations ------------------------------------------------------------------
Access = Literal["public", "read", "write"]


@dataclass(frozen=True)
class Reply:
    """A success (or documented non-problem) answer: status, body type, media type, headers."""

    status: int
    body: Any = None  # a type msgspec describes; None: no content
    description: str = ""
    media_type: str = "application/json"
    headers: Mapping[str, str] = field(default_factory=dict)  # name → what it holds


@dataclass(frozen=True)
class Operation:
    """What one route takes and answers; validation and the OpenAPI document both read it."""

    operation_id: str
    summary: str
    access: Access
    replies: tuple[Reply, ...]
    description: str = ""
    tag: str = "devices"
    path: Mapping[str, Any] = field(default_factory=dict)  # name → annotated type
    query: type[Struct] | None = None  # None: no query parameter is accepted
    body: type[Struct] | None = None
    body_limit: int = MAX_BODY_BYTES
    problems: frozenset[str] = frozenset()  # what the handler or store may raise besides


# --- the event stream (gateway/eventstream.py) ---------------------------------------
STREAM_TYPES = ("presence", "state", "registry", "command")
_STREAM_TYPE = "(presence|state|registry|command)"


class EventStreamQuery(Struct, forbid_unknown_fields=True):
    after: (
        Annotated[
            Position,
            Meta(
                description="Send events after this position (an event's `id:`); the "
                "`Last-Event-ID` header wins when both are given; default: from now on"
            ),
        ]
        | UnsetType
    ) = UNSET
    types: (
        Annotated[
            str,
            _text(
                f"^{_STREAM_TYPE}(,{_STREAM_TYPE}){{0,3}}{END}",
                "a comma-separated list of presence, state, registry, command",
            ),
        ]
        | UnsetType
    ) = UNSET
    device_type: (
        Annotated[DeviceType, Meta(description="Only events of devices of this type")] | UnsetType
    ) = UNSET
    device_prefix: (
        Annotated[
            str,
            _text(
                _whole(keys.ID_PATTERN),
                f"1–128 characters of {NAME_CHARACTERS}: only devices whose id starts so",
            ),
        ]
        | UnsetType
    ) = UNSET


# --- webhooks (gateway/webhooks/) ----------------------------------------------------
StreamType = Literal["presence", "state", "registry", "command"]
WebhookId = Annotated[
    str, _text("^wh_[0-9a-f]{16}" + END, "wh_ and 16 hex digits", problem="webhook-not-found")
]
WebhookUrl = Annotated[
    str,
    Meta(
        min_length=1,
        max_length=2048,
        description="Where events are POSTed: http(s); loopback, private and link-local "
        "addresses are refused unless GATEWAY_WEBHOOK_ALLOW_PRIVATE=true",
        extra={"also": ("webhook-target-refused",)},
    ),
]
WebhookTypes = Annotated[
    list[StreamType], Meta(min_length=1, max_length=4, description="The event types delivered")
]
Description = Annotated[str, Meta(max_length=500, description="For people; not used")]


def _every_type() -> list[StreamType]:
    return ["presence", "state", "registry", "command"]


class WebhookCreate(Struct, forbid_unknown_fields=True):
    """A webhook endpoint to create; it gets the events written from now on."""

    url: WebhookUrl
    types: WebhookTypes = msgspec_field(default_factory=_every_type)
    device_type: (
        Annotated[DeviceType, Meta(description="Only events of devices of this type")] | UnsetType
    ) = UNSET
    description: Description = ""
    enabled: bool = True


class WebhookPatch(Struct, forbid_unknown_fields=True):
    """Changes to a webhook endpoint; `{"enabled": true}` resumes a failing one where it
    stopped."""

    url: WebhookUrl | UnsetType = UNSET
    types: WebhookTypes | UnsetType = UNSET
    device_type: (
        Annotated[DeviceType | None, Meta(description="null: every device type")] | UnsetType
    ) = UNSET
    description: Description | UnsetType = UNSET
    enabled: bool | UnsetType = UNSET


class Webhook(Struct, forbid_unknown_fields=True):
    """A webhook endpoint (never its secret)."""

    webhook_id: WebhookId
    url: str
    types: list[StreamType]
    device_type: DeviceType | None
    description: str
    enabled: bool
    status: Annotated[
        Literal["active", "failing", "disabled"],
        Meta(
            description="active: delivering; failing: gave up after the retry limit (PATCH "
            "enabled true to resume from where it stopped); disabled: by a PATCH"
        ),
    ]
    created_at: Seconds
    cursor: Annotated[
        Position, Meta(description="Events after this position are not yet delivered")
    ]
    failing_since: Annotated[
        Seconds | None, Meta(description="When the event now retried first failed")
    ]
    last_error: Annotated[str | None, Meta(description="Why the last failed attempt failed")]


class WebhookCreated(Webhook):
    secret: Annotated[
        str, Meta(description="The signing secret (whsec_ + base64); shown only here")
    ]


class WebhookList(Struct, forbid_unknown_fields=True):
    items: list[Webhook]


class WebhookSecret(Struct, forbid_unknown_fields=True):
    secret: Annotated[
        str,
        Meta(
            description="The new signing secret, shown only here; the previous one also "
            "signs for 24 hours"
        ),
    ]


class Delivery(Struct, forbid_unknown_fields=True):
    """One delivery attempt."""

    webhook_id: Annotated[str, Meta(description="The `webhook-id` sent: the event's id")]
    attempt: Annotated[int, Meta(ge=1)]
    result: Literal["succeeded", "failed", "gave_up", "gap"]
    status_code: int | None
    latency_ms: float
    error: str | None
    at: Seconds


class DeliveryPage(Struct, forbid_unknown_fields=True):
    """Recent attempts, newest first (the latest 100 are kept)."""

    items: list[Delivery]


class DeliveriesQuery(Struct, forbid_unknown_fields=True):
    limit: Annotated[int, Meta(ge=1, le=100, description="Largest number of attempts")] = 50


class ReplayQuery(Struct, forbid_unknown_fields=True):
    after: Annotated[Position, Meta(description="Deliver again every event after this position")]
