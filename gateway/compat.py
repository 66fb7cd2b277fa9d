"""Where the gateway reaches into other libraries' private parts: here, and nowhere else.

Each reach-in is a function below, with why it is needed; the two subclasses that override
library internals (`wsprotocol.WebSocketProtocol` on uvicorn's sans-I/O WebSocket protocol,
`admission.AdmissionProtocol` on its httptools HTTP protocol) name what they touch in
`PROTOCOL_ATTRIBUTES`. `check()` verifies, when `gateway serve` starts, that the installed
versions still have all of it, and start-up stops with a one-line message if not: a library
update fails loudly instead of quietly losing back-pressure, admission control or memory.
pyproject.toml admits exactly the versions this was tested with (`TESTED`).

What would let these go, offered upstream in words:
- uvicorn: its sans-I/O WebSocket protocol ignores `ws_max_queue` and pauses reading after
  every message (two `epoll_ctl` calls per frame, a fifth of the gateway's CPU); a read
  high-water mark (pause when N messages wait for the app, resume when it took them all) keeps
  the same bound without the churn. A denial response should complete the handshake (it is
  logged at ERROR today, Kludex/uvicorn#3138). A close the app sends should not wait 10 s for
  a peer that does not read. A deadline for the request head would make admission control
  (slowloris) a setting. And an ASGI extension to abort a connection would replace reaching
  for the transport.
- uvicorn and websockets keep the parsed upgrade request and the 101 response for the life of
  the connection (about 5 KiB per idle socket); releasing them after the handshake would make
  `release_handshake` unnecessary.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import MutableMapping
from typing import Any

from starlette.datastructures import State
from starlette.websockets import WebSocket

RAW_SEND = "gateway.raw_send"  # the server's own ASGI send, kept in the scope by the app
# what only the handshake reads; an accepted socket lives for days without it
HANDSHAKE_SCOPE_KEYS = (
    "headers", "query_string", "raw_path", "subprotocols", "extensions", "state", "asgi",
)  # fmt: skip
STARLETTE_CACHES = ("_headers", "_query_params")
TESTED = {"uvicorn": "0.54", "websockets": "17", "starlette": "1.10", "redis": "8.1"}
PROTOCOL_ATTRIBUTES = {
    # WebSocketsSansIOProtocol, as wsprotocol.py uses it
    "websocket": (
        "send_receive_event_to_app", "run_asgi", "handle_parser_exception", "handle_events",
        "send_500_response",
    ),
    # HttpToolsProtocol's callbacks admission.py overrides
    "http": (
        "connection_made", "connection_lost", "on_message_begin", "on_message_complete",
        "handle_websocket_upgrade",
    ),
}  # fmt: skip
CLUSTER_NODE_ATTRIBUTES = ("_free", "_connections")  # idle_cluster_connections


def server_protocol(scope: MutableMapping[str, Any]) -> Any:
    """uvicorn's protocol object of this connection: the owner of the server's own `send`.

    ASGI gives an app no handle on its connection; the gateway needs one to drop a stalled
    peer and to release what the handshake left behind.
    """
    return getattr(scope.get(RAW_SEND), "__self__", None)


def abort(websocket: WebSocket) -> None:
    """Drop the TCP connection now (ASGI has no abort; uvicorn's protocol owns the transport)."""
    transport = getattr(server_protocol(websocket.scope), "transport", None)
    if transport is not None:
        transport.abort()


def release_handshake(websocket: WebSocket) -> None:
    """Drop what the handshake needed and an open socket never reads again (~5 KiB a socket).

    uvicorn keeps the parsed upgrade request and the 101 response on its protocol object, and
    the scope (shared with that object) keeps a copy of the request headers, which Starlette's
    cached `headers` and `query_params` also hold. Nothing reads them after `accept`. Scope
    keys are deleted, not emptied, so a later reader fails loudly instead of seeing nothing.
    """
    scope = websocket.scope
    for key in HANDSHAKE_SCOPE_KEYS:
        scope.pop(key, None)
    for cached in STARLETTE_CACHES:
        websocket.__dict__.pop(cached, None)
    protocol = server_protocol(scope)
    request = getattr(protocol, "request", None)
    if request is not None:
        # websockets' frame parser keeps the request alive too (a local of its suspended
        # generator): empty its headers, the bulk of it and the token, in place
        request.headers.clear()
        protocol.request = None
    if getattr(protocol, "response", None) is not None:
        protocol.response = None


def app_state(app: Any) -> State | None:
    """The Starlette app's state under whatever middleware uvicorn wrapped around it."""
    while hasattr(app, "app") and not hasattr(app, "state"):
        app = app.app
    state = getattr(app, "state", None)
    return state if isinstance(state, State) else None


def idle_cluster_connections(node: Any, keep: int) -> list[Any]:
    """Take all but *keep* of a cluster node's idle connections out of its pool (the caller
    closes them).

    redis-py's cluster pool hands connections out round-robin and never closes one, so a
    burst leaves every node with as many open connections as it ever had at once. Trimming
    the idle ones keeps a quiet process at one connection per node.
    """
    free, every = node._free, node._connections
    taken = []
    while len(free) > keep:
        connection = free.pop()
        every.remove(connection)
        taken.append(connection)
    return taken


def missing() -> list[str]:
    """What the installed libraries lack of what the gateway uses: each a reason not to start."""
    from redis.asyncio.cluster import ClusterNode
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

    problems = []
    node = ClusterNode("127.0.0.1", 1)
    if not all(hasattr(node, name) for name in CLUSTER_NODE_ATTRIBUTES):
        problems.append(f"redis-py's ClusterNode lacks {', '.join(CLUSTER_NODE_ATTRIBUTES)}")
    for kind, cls in (("websocket", WebSocketsSansIOProtocol), ("http", HttpToolsProtocol)):
        absent = [name for name in PROTOCOL_ATTRIBUTES[kind] if not hasattr(cls, name)]
        if absent:
            problems.append(f"uvicorn's {cls.__name__} lacks {', '.join(absent)}")
    return problems


def untested() -> list[str]:
    """Installed versions other than the tested ones (worth a warning, not a refusal)."""
    found = []
    for package, tested in TESTED.items():
        installed = importlib.metadata.version(package)
        if installed != tested and not installed.startswith(tested + "."):
            found.append(f"{package} {installed} (tested: {tested}.x)")
    return found
