"""The `gateway` console script."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import logging
import sys
from collections.abc import AsyncIterator, Sequence
from typing import Any

import uvicorn
from starlette.types import ASGIApp

from gateway import __version__, redact
from gateway.admission import Admission
from gateway.app import create_app
from gateway.config import ConfigError, Settings, from_env
from gateway.embedded import EmbeddedRedis
from gateway.metrics import Metrics
from gateway.wsprotocol import WebSocketProtocol

log = logging.getLogger("gateway")
GC_THRESHOLDS = (50_000, 20, 100)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gateway", description="IoT presence gateway")
    parser.add_argument("--version", action="version", version=f"gateway {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
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
    serve.add_argument("--ssl-certfile", help="TLS certificate (PEM); serves https/wss")
    serve.add_argument("--ssl-keyfile", help="TLS private key (PEM)")
    return parser


def settings_from(args: argparse.Namespace) -> Settings:
    base = from_env()
    return base.with_overrides(
        host=args.host,
        port=args.port,
        redis_url=args.redis_url,
        api_key=args.api_key,
        heartbeat_timeout=args.heartbeat_timeout,
        offline_grace=args.offline_grace,
        data_dir=None if args.data_dir is None else __import__("pathlib").Path(args.data_dir),
        log_level=args.log_level,
    )


@contextlib.asynccontextmanager
async def redis_for(settings: Settings) -> AsyncIterator[Settings]:
    """Settings with a Redis URL: the configured one, or a private embedded server's."""
    if settings.redis_url:
        yield settings
        return
    async with EmbeddedRedis(settings.data_dir, log=log) as embedded:
        log.info(
            "no REDIS_URL: using embedded valkey at %s (data in %s)",
            embedded.url,
            settings.data_dir,
        )
        yield settings.with_overrides(redis_url=embedded.url)


class GatewayServer(uvicorn.Server):
    """uvicorn, but sessions end (grace or `gateway_shutdown`) before sockets are closed."""

    async def shutdown(self, sockets: list[object] | None = None) -> None:  # type: ignore[override]
        app = self.config.loaded_app
        while hasattr(app, "app") and not hasattr(app, "state"):
            app = app.app
        gateway = getattr(getattr(app, "state", None), "gateway", None)
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
        "log_level": settings.log_level,
        "lifespan": "on",
        "http": admission.protocol_class(),
        "ws": WebSocketProtocol,
        "ws_max_size": settings.max_frame_bytes,
        "ws_ping_interval": settings.ws_ping_interval,
        "ws_ping_timeout": settings.ws_ping_timeout,
        "ws_per_message_deflate": settings.device_compression,
    }
    return uvicorn.Config(app, **(options | overrides))


async def serve(settings: Settings, ssl_certfile: str | None, ssl_keyfile: str | None) -> None:
    # thousands of long-lived socket objects make every full collection walk them all: a
    # pause felt by every device at once. Freeze what start-up made and collect less often.
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
    async with redis_for(settings) as ready:
        app = create_app(ready)
        config = uvicorn_config(
            app, ready, ssl_certfile=ssl_certfile, ssl_keyfile=ssl_keyfile,
            timeout_graceful_shutdown=10,
        )  # fmt: skip
        await GatewayServer(config).serve()


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        settings = settings_from(args)
    except ConfigError as exc:
        print(f"gateway: {exc}", file=sys.stderr)
        raise SystemExit(2) from exc
    redact.install()
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    asyncio.run(serve(settings, args.ssl_certfile, args.ssl_keyfile))
