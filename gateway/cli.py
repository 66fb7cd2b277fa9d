"""The `gateway` console script.

`gateway serve` checks everything it can before it starts anything (settings, the listening
socket, the data directory), so a mistake costs one line on stderr naming the flag or variable
and leaves nothing running. Once up, SIGTERM and SIGINT (Ctrl-C) both shut down the same way:
devices are ended (grace or `gateway_shutdown`), sockets closed with 1012, and the embedded
Redis stopped with its own SHUTDOWN; the exit status is 0. A second Ctrl-C stops waiting for
open connections.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import gc
import logging
import signal
import socket
import sys
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn

import uvicorn
from redis.exceptions import RedisError
from starlette.types import ASGIApp

from gateway import __version__, compat, redact
from gateway.admission import Admission
from gateway.app import create_app
from gateway.config import ConfigError, Settings, StartupError, from_env, option_name
from gateway.devcluster import LocalCluster, run_forever
from gateway.embedded import EmbeddedRedis
from gateway.metrics import Metrics
from gateway.migrate.command import migrate
from gateway.migrate.runner import MigrateRefused
from gateway.wsprotocol import WebSocketProtocol

log = logging.getLogger("gateway")
GC_THRESHOLDS = (50_000, 20, 100)
GRACEFUL_SHUTDOWN_SECONDS = 10
BACKLOG = 2048


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line, like every other start-up mistake."""

    def error(self, message: str) -> NoReturn:
        fail(f"{message} (see `{self.prog} --help`)")


def fail(message: str, status: int = 2) -> NoReturn:
    print(f"gateway: {message}", file=sys.stderr, flush=True)
    raise SystemExit(status)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="gateway", description="IoT presence gateway")
    parser.add_argument("--version", action="version", version=f"gateway {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    serve = commands.add_parser("serve", help="run the gateway (embedded Redis without a URL)")
    serve.add_argument("--host", help="bind address (GATEWAY_HOST, default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (PORT, default 8000)")
    serve.add_argument("--redis-url", help="Redis URL (REDIS_URL); none: start embedded valkey")
    serve.add_argument("--api-key", help="admin API key (GATEWAY_API_KEY)")
    serve.add_argument(
        "--heartbeat-timeout", type=float, help="seconds of silence before offline (default 60)"
    )
    serve.add_argument(
        "--offline-grace",
        type=float,
        help="seconds a dropped device may return "
        "without an offline event (GATEWAY_OFFLINE_GRACE, default 0)",
    )
    serve.add_argument("--data-dir", help="embedded Redis data directory (default ./data)")
    serve.add_argument("--log-level", help="debug, info, warning (GATEWAY_LOG_LEVEL)")
    serve.add_argument(
        "--mqtt-url", help="MQTT broker for MQTT devices, mqtt:// or mqtts:// (GATEWAY_MQTT_URL)"
    )
    serve.add_argument("--ssl-certfile", help="TLS certificate (PEM); serves https/wss")
    serve.add_argument("--ssl-keyfile", help="TLS private key (PEM)")
    serve.add_argument(
        "--new-admin-key",
        action="store_true",
        help="replace the generated admin API key with a new one, printed once",
    )
    cluster = commands.add_parser(
        "dev-cluster", help="run a local Valkey Cluster to try the gateway on (Ctrl-C stops it)"
    )
    cluster.add_argument("--data-dir", default="dev-cluster", help="node data (./dev-cluster)")
    cluster.add_argument("--port", type=int, default=7000, help="first node's port (7000)")
    cluster.add_argument("--primaries", type=int, default=3, help="primaries (3)")
    cluster.add_argument("--replicas", type=int, default=1, help="replicas per primary (1)")
    migrate = commands.add_parser(
        "migrate",
        help="upgrade the data an earlier release stored (dry run unless --apply)",
        description="Show what upgrading the stored layout to this release's changes (keys, "
        "changes, time), or with --apply do it. Resumable: stopped at any point, run it again.",
    )
    migrate.add_argument("--redis-url", help="Redis URL (REDIS_URL); none: the embedded one")
    migrate.add_argument("--data-dir", help="embedded Redis data directory (default ./data)")
    migrate.add_argument("--apply", action="store_true", help="write the changes")
    migrate.add_argument(
        "--batch", type=int, default=500, help="keys per SCAN step and pipeline (500)"
    )
    return parser


def settings_from(args: argparse.Namespace) -> Settings:
    base = from_env()
    settings = base.with_overrides(
        host=args.host,
        port=args.port,
        redis_url=args.redis_url,
        api_key=args.api_key,
        heartbeat_timeout=args.heartbeat_timeout,
        offline_grace=args.offline_grace,
        data_dir=None if args.data_dir is None else Path(args.data_dir),
        log_level=args.log_level,
        mqtt_url=args.mqtt_url,
        new_admin_key=args.new_admin_key or None,
    )
    if settings.new_admin_key and settings.api_key:
        raise ConfigError(
            "an admin key is configured, so none is generated; change the configured one",
            "api_key",
        )
    for flag, path in (("--ssl-certfile", args.ssl_certfile), ("--ssl-keyfile", args.ssl_keyfile)):
        if path is not None and not Path(path).is_file():
            raise ConfigError(f"{flag}: no such file: {path}")
    if bool(args.ssl_certfile) != bool(args.ssl_keyfile):
        raise ConfigError("--ssl-certfile and --ssl-keyfile go together; pass both")
    return settings


class Stop:
    """SIGINT and SIGTERM, from the first moment of `serve`: the first asks for a clean
    shutdown at whatever stage start-up is in; a second SIGINT stops waiting for connections."""

    def __init__(self) -> None:
        self.requested = asyncio.Event()
        self.server: uvicorn.Server | None = None

    @contextlib.contextmanager
    def installed(self) -> Iterator[Stop]:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, self._received, signum)
        try:
            yield self
        finally:
            for signum in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(signum)

    def request(self) -> None:
        """Stop as a signal would, without one (the gateway refused the data it found)."""
        if not self.requested.is_set():
            self.requested.set()
            if self.server is not None:
                self.server.should_exit = True

    def _received(self, signum: int) -> None:
        if self.requested.is_set():
            if self.server is not None and signum == signal.SIGINT:
                self.server.force_exit = True
            return
        log.info("%s received: shutting down", signal.Signals(signum).name)
        self.requested.set()
        if self.server is not None:
            self.server.should_exit = True

    async def racing(self, start: Any) -> bool:
        """Run the coroutine *start* unless a stop comes first (then it is cancelled, and
        its own cleanup runs); True when it finished."""
        task = asyncio.ensure_future(start)
        stopped = asyncio.ensure_future(self.requested.wait())
        try:
            await asyncio.wait({task, stopped}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopped.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            return False
        task.result()
        return True


@contextlib.asynccontextmanager
async def redis_for(settings: Settings, stop: Stop) -> AsyncIterator[Settings | None]:
    """Settings with a Redis URL: the configured one, or a private embedded server's.

    Yields None when a stop arrived while the embedded server was starting.
    """
    if settings.redis_url:
        yield settings
        return
    embedded = EmbeddedRedis(settings.data_dir, log=log)
    if not await stop.racing(embedded.start()):
        yield None
        return
    try:
        log.info(
            "no REDIS_URL: using embedded valkey at %s (data in %s)",
            embedded.url,
            embedded.data_dir,
        )
        yield settings.with_overrides(redis_url=embedded.url)
    finally:
        await embedded.stop()


class GatewayServer(uvicorn.Server):
    """uvicorn, but sessions end (grace or `gateway_shutdown`) before sockets are closed, and
    signals belong to `Stop`: uvicorn would re-raise them after shutting down, which kills the
    process (status 143, an orphaned embedded Redis) or ends in a KeyboardInterrupt traceback."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield

    async def shutdown(self, sockets: list[object] | None = None) -> None:  # type: ignore[override]
        gateway = getattr(compat.app_state(self.config.loaded_app), "gateway", None)
        if gateway is not None:
            await gateway.drain()
        await super().shutdown(sockets)  # type: ignore[arg-type]


def uvicorn_config(app: ASGIApp, settings: Settings, **overrides: Any) -> uvicorn.Config:
    """How the gateway is served: admission control, its WebSocket protocol, limits and pings."""
    gateway = getattr(getattr(app, "state", None), "gateway", None)
    admission = Admission(settings, gateway.metrics if gateway is not None else Metrics())
    # Admission, not uvicorn's `limit_concurrency`: that one is checked only once a request
    # head is complete (a connection that never sends one holds its descriptor regardless),
    # and over its limit it answers 503 to every request, on connections already open too,
    # /readyz included, so a full process would fail its health checks. Admission refuses at
    # accept and leaves every connection it admitted alone.
    options: dict[str, Any] = {
        "host": settings.host,
        "port": settings.port,
        "log_level": settings.log_level.lower(),
        "lifespan": "on",
        "http": admission.protocol_class(),
        "ws": WebSocketProtocol,
        "ws_max_size": settings.max_frame_bytes,
        "ws_ping_interval": settings.ws_ping_interval,
        "ws_ping_timeout": settings.ws_ping_timeout,
        "ws_per_message_deflate": settings.device_compression,
    }
    return uvicorn.Config(app, **(options | overrides))


def listen(settings: Settings) -> socket.socket:
    """Bind the server's socket before anything else starts: a taken port is found at once."""
    try:
        infos = socket.getaddrinfo(
            settings.host, settings.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror as exc:
        raise StartupError(
            f"{option_name('host')}: cannot resolve {settings.host!r} ({exc.strerror})"
        ) from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        sock.listen(BACKLOG)
    except OSError as exc:
        sock.close()
        raise StartupError(_bind_problem(settings, exc)) from None
    sock.set_inheritable(True)
    return sock


def _bind_problem(settings: Settings, exc: OSError) -> str:
    where = f"{settings.host}:{settings.port}"
    if exc.errno == errno.EADDRINUSE:
        return (
            f"{option_name('port')}: {where} is already in use (another gateway?); "
            "pass another --port or set PORT"
        )
    if exc.errno == errno.EACCES:
        return (
            f"{option_name('port')}: not allowed to listen on {where} "
            "(ports below 1024 need privileges)"
        )
    if exc.errno == errno.EADDRNOTAVAIL:
        return f"{option_name('host')}: {settings.host} is not an address of this machine"
    return f"{option_name('port')}: cannot listen on {where}: {exc.strerror}"


def dashboard_url(settings: Settings, scheme: str = "http") -> str:
    """Where a browser on this machine finds the dashboard (a wildcard bind means loopback)."""
    host = {"0.0.0.0": "127.0.0.1", "::": "[::1]"}.get(settings.host, settings.host)
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{scheme}://{host}:{settings.port}/"


async def serve(settings: Settings, ssl_certfile: str | None, ssl_keyfile: str | None) -> None:
    # thousands of long-lived socket objects make every full collection walk them all: a
    # pause felt by every device at once. Freeze what start-up made and collect less often.
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
    scheme = "https" if ssl_certfile else "http"
    stop = Stop()
    if settings.mqtt_url:
        from gateway.mqtt.bridge import probe  # only with MQTT configured

        await probe(settings)
    with stop.installed(), contextlib.closing(listen(settings)) as listener:
        async with redis_for(settings, stop) as ready:
            if ready is None:
                return
            ready = ready.with_overrides(
                public_url=ready.public_url or dashboard_url(ready, scheme)
            )
            app = create_app(ready)
            config = uvicorn_config(
                app, ready, ssl_certfile=ssl_certfile, ssl_keyfile=ssl_keyfile,
                timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS,
            )  # fmt: skip
            server = GatewayServer(config)
            stop.server = server
            if stop.requested.is_set():
                return
            log.info("serving the gateway and its dashboard at %s", ready.public_url)
            gateway = app.state.gateway
            refused = asyncio.ensure_future(gateway.refused.wait())
            refused.add_done_callback(lambda _: stop.request())
            try:
                await server.serve(sockets=[listener])
            finally:
                refused.cancel()
            if gateway.refusal is not None:
                raise StartupError(gateway.refusal)


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.command == "dev-cluster":
        dev_cluster(args)
        return
    if args.command == "migrate":
        migrate_command(args)
        return
    try:
        settings = settings_from(args)
    except ConfigError as exc:
        fail(str(exc))
    problems = compat.missing()
    if problems:
        fail(f"{'; '.join(problems)}: install the versions in pyproject.toml", status=1)
    redact.install()
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    for found in compat.untested():
        log.warning("untested library version: %s; see pyproject.toml", found)
    try:
        asyncio.run(serve(settings, args.ssl_certfile, args.ssl_keyfile))
    except StartupError as exc:
        fail(str(exc), status=1)
    except KeyboardInterrupt:  # only before the signal handlers are in place
        raise SystemExit(130) from None


def dev_cluster(args: argparse.Namespace) -> None:
    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cluster = LocalCluster(
            Path(args.data_dir), args.primaries, args.replicas, base_port=args.port
        )
        asyncio.run(run_forever(cluster))
    except StartupError as exc:
        fail(str(exc), status=1)


def migrate_command(args: argparse.Namespace) -> None:
    """`gateway migrate`: every refusal and every Redis failure is one line; exit status 1."""
    if args.batch < 1:
        fail("--batch: at least 1")
    try:
        settings = from_env().with_overrides(
            redis_url=args.redis_url,
            data_dir=None if args.data_dir is None else Path(args.data_dir),
        )
    except ConfigError as exc:
        fail(str(exc))
    logging.basicConfig(level="WARNING", format="%(levelname)s %(name)s: %(message)s")
    redact.install()
    try:
        asyncio.run(migrate(settings, args.apply, args.batch))
    except (MigrateRefused, StartupError) as exc:
        fail(str(exc), status=1)
    except RedisError as exc:
        fail(f"Redis failed during the migration ({exc}); run it again: it goes on "
             "where it stopped", status=1)  # fmt: skip
    except KeyboardInterrupt:
        fail("interrupted; run it again: it goes on where it stopped", status=130)
