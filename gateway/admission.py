"""Admission control: how long a new connection may take to say what it wants, and how many may.

A connection that has not sent a complete request costs a file descriptor and gives nothing
back, and uvicorn alone waits for its bytes forever (slowloris, or firmware stuck mid-handshake).
Here every accepted connection

- is refused at once (a 503, then closed) when the process already holds `max_connections`
  connections of any kind, or when its source address already holds `max_pending_per_address`
  connections that are still pending;
- is pending until its request is complete (head and body, or a WebSocket upgrade request),
  and is closed if that takes longer than `handshake_timeout`;
- once complete, is never touched here again: an upgraded WebSocket lives by its pings, a
  kept-alive HTTP connection by uvicorn's keep-alive timeout, and gets a new deadline only
  when its next request begins.

Only the client decides how long a request takes to arrive; once it has, the gateway answers
by itself, so the deadline ends there. Refusals and timeouts are counted in /metrics and
logged in aggregate, at most one line per `LOG_INTERVAL`.

The hook is a subclass of uvicorn's httptools protocol, the class uvicorn creates for every
accepted connection; the callbacks it overrides are checked at start-up (compat.py).
"""

from __future__ import annotations

import asyncio
import logging
import resource
from asyncio import TimerHandle
from collections.abc import Collection
from typing import ClassVar

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from gateway.config import Settings, env_name
from gateway.metrics import Metrics

log = logging.getLogger("gateway.admission")

LOG_INTERVAL = 10.0  # seconds: at most one summary line per interval, none when quiet
RESERVE_MIN = 128  # descriptors kept back from connections: Redis pools, listeners, files
RESERVE_MAX = 4096
REFUSAL_BODY = b"the gateway is at its connection limit; retry later\n"
REFUSAL = b"".join(
    [
        b"HTTP/1.1 503 Service Unavailable\r\n",
        b"content-type: text/plain; charset=utf-8\r\n",
        b"content-length: %d\r\n" % len(REFUSAL_BODY),
        b"retry-after: 1\r\n",
        b"connection: close\r\n\r\n",
        REFUSAL_BODY,
    ]
)
PROCESS_LIMIT = "process"
ADDRESS_LIMIT = "address"


def reserve_for(fd_limit: int) -> int:
    """Descriptors kept back from client connections: a tenth of the limit, within bounds."""
    return min(max(fd_limit // 10, RESERVE_MIN), RESERVE_MAX)


def derived_limit(fd_limit: int) -> int:
    """The connection limit for a process allowed *fd_limit* open descriptors."""
    return max(1, fd_limit - reserve_for(fd_limit))


def fd_limit() -> int | None:
    """This process's soft RLIMIT_NOFILE (None: unlimited)."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return None if soft == resource.RLIM_INFINITY else soft


class Admission:
    """The policy of one server: deadline, limits, pending counts per address, their reporting.

    Runs on the event loop only (protocol callbacks), so plain counters suffice.
    """

    def __init__(self, settings: Settings, metrics: Metrics, fds: int | None = None) -> None:
        fds = fd_limit() if fds is None else fds
        self.timeout = settings.handshake_timeout
        self.max_connections = settings.max_connections or (
            None if fds is None else derived_limit(fds)
        )
        self.max_pending_per_address = settings.max_pending_per_address or None
        self.pending: dict[str, int] = {}  # source address → its pending connections
        self.pending_total = 0
        self._open: Collection[object] = ()
        self._noted = {"timeout": 0, PROCESS_LIMIT: 0, ADDRESS_LIMIT: 0}
        self._summary: TimerHandle | None = None
        self._timeouts = metrics.handshake_timeouts
        self._refused = {
            reason: metrics.connections_refused.labels(reason)
            for reason in (PROCESS_LIMIT, ADDRESS_LIMIT)
        }
        metrics.connections_limit.set(self.max_connections or 0)
        metrics.connections_open.set_function(lambda: len(self._open))
        metrics.connections_pending.set_function(lambda: self.pending_total)
        if settings.max_connections and fds is not None and settings.max_connections > fds:
            log.warning(
                "%s=%d is above this process's file-descriptor limit (%d): accept() will fail "
                "before the limit is reached; raise `ulimit -n` or lower it",
                env_name("max_connections"),
                settings.max_connections,
                fds,
            )

    def protocol_class(self) -> type[AdmissionProtocol]:
        """The HTTP protocol class for uvicorn's `http=`, bound to this policy."""
        return type("AdmissionProtocol", (AdmissionProtocol,), {"admission": self})

    def admit(self, host: str, open_connections: Collection[object]) -> bool:
        """Whether a connection just accepted from *host* may stay; if so it is pending.

        *open_connections* are the server's connections, this one among them.
        """
        self._open = open_connections
        if self.max_connections is not None and len(open_connections) > self.max_connections:
            self._refuse(PROCESS_LIMIT)
            return False
        limit = self.max_pending_per_address
        if limit is not None and self.pending.get(host, 0) >= limit:
            self._refuse(ADDRESS_LIMIT)
            return False
        self.arrive(host)
        return True

    def arrive(self, host: str) -> None:
        """A connection from *host* starts a request: pending until `complete`."""
        self.pending[host] = self.pending.get(host, 0) + 1
        self.pending_total += 1

    def complete(self, host: str) -> None:
        """A pending connection from *host* sent its whole request, or went away."""
        left = self.pending[host] - 1
        if left:
            self.pending[host] = left
        else:
            del self.pending[host]
        self.pending_total -= 1

    def expired(self, host: str) -> None:
        """A pending connection from *host* ran out of time; its closing follows."""
        self.complete(host)
        self._timeouts.inc()
        self._note("timeout")

    def _refuse(self, limit: str) -> None:
        self._refused[limit].inc()
        self._note(limit)

    def _note(self, event: str) -> None:
        self._noted[event] += 1
        if self._summary is None:
            loop = asyncio.get_running_loop()
            self._summary = loop.call_later(LOG_INTERVAL, self.log_summary)

    def log_summary(self) -> None:
        """One line for everything noted since the last one."""
        self._summary = None
        noted, self._noted = self._noted, dict.fromkeys(self._noted, 0)
        parts = []
        if noted["timeout"]:
            parts.append(
                f"{noted['timeout']} connections closed for not sending a complete request "
                f"within {self.timeout:g} s"
            )
        if noted[PROCESS_LIMIT]:
            parts.append(
                f"{noted[PROCESS_LIMIT]} refused at the process limit of {self.max_connections}"
            )
        if noted[ADDRESS_LIMIT]:
            parts.append(
                f"{noted[ADDRESS_LIMIT]} refused at the limit of "
                f"{self.max_pending_per_address} pending per address"
            )
        if not parts:
            return
        state = f"now {len(self._open)} open, {self.pending_total} pending"
        if self.pending:
            host, count = max(self.pending.items(), key=lambda item: item[1])
            state += f", most from {host or 'a unix socket'} ({count})"
        log.warning("admission control, last %g s: %s; %s", LOG_INTERVAL, "; ".join(parts), state)


class AdmissionProtocol(HttpToolsProtocol):
    """uvicorn's HTTP protocol, with a deadline on each request and limits at accept.

    A pending connection holds one `TimerHandle`; completing the request cancels it, and
    nothing of admission control stays with an upgraded WebSocket.
    """

    admission: ClassVar[Admission]
    _deadline: TimerHandle | None = None  # set while pending

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if self.admission.admit(self._host(), self.connections):
            self._deadline = self.loop.call_later(self.admission.timeout, self._expire)
        else:
            transport.write(REFUSAL)
            transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._complete()
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._deadline is None:  # the next request on a kept-alive connection
            self.admission.arrive(self._host())
            self._deadline = self.loop.call_later(self.admission.timeout, self._expire)

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._complete()

    def handle_websocket_upgrade(self) -> None:
        self._complete()
        super().handle_websocket_upgrade()

    def _host(self) -> str:
        return self.client[0] if self.client else ""

    def _complete(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
            self.admission.complete(self._host())

    def _expire(self) -> None:
        self._deadline = None
        self.admission.expired(self._host())
        self.transport.close()
