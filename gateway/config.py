"""Settings: the one reader of the environment.

Every option has a CLI flag and an environment variable. Platforms set `REDIS_URL` and
`PORT`; everything else is prefixed `GATEWAY_`. Settings are frozen once built, so every
module sees the same values for the life of the process.
"""

from __future__ import annotations

import math
import os
import re
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")
SEED_SCHEMAS = ("python", "node")
PREFIX_PATTERN = re.compile(r"[A-Za-z0-9._:-]{0,64}")
REDIS_SCHEMES = ("redis", "rediss", "unix")

# settings that have a flag on `gateway serve` as well as an environment variable
FLAGS = {
    "host": "--host",
    "port": "--port",
    "redis_url": "--redis-url",
    "api_key": "--api-key",
    "heartbeat_timeout": "--heartbeat-timeout",
    "offline_grace": "--offline-grace",
    "data_dir": "--data-dir",
    "log_level": "--log-level",
    "mqtt_url": "--mqtt-url",
}
MQTT_SCHEMES = ("mqtt", "mqtts")
MQTT_PREFIX_PATTERN = re.compile(r"[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)*")


class ConfigError(ValueError):
    """A setting has a value the gateway cannot run with; the message names the setting."""

    def __init__(self, message: str, setting: str | None = None) -> None:
        super().__init__(f"{option_name(setting)}: {message}" if setting else message)
        self.setting = setting


class StartupError(RuntimeError):
    """The gateway cannot start as configured: a one-line message saying which option and what
    to do, for the console, never a traceback."""


def option_name(setting: str) -> str:
    """How a user sets *setting*: `--port / PORT`, or just the variable when there is no flag."""
    flag = FLAGS.get(setting)
    variable = env_name(setting)
    return f"{flag} / {variable}" if flag else variable


@dataclass(frozen=True)
class Settings:
    host: str = "127.0.0.1"
    port: int = 8000
    redis_url: str | None = None
    data_dir: Path = Path("data")
    key_prefix: str = ""
    # hash-field names of the single-node layout: the Python classes' (default) or Node.js'
    seed_schema: str = "python"
    cluster_partitions: int = 64  # on a cluster: fixed for the life of the data
    pubsub_probe_interval: float = 5.0  # cluster: how often each subscription proves it delivers
    api_key: str | None = None
    read_api_keys: tuple[str, ...] = ()
    allowed_origins: tuple[str, ...] = ()
    heartbeat_timeout: float = 60.0
    offline_grace: float = 0.0
    batch_interval: float = 0.01
    sweep_interval: float = 1.0
    max_frame_bytes: int = 65536
    max_section_bytes: int = 32768
    max_depth: int = 8
    max_key_length: int = 128
    rate_limit: float = 50.0
    rate_burst: int = 100
    send_queue_size: int = 256
    malformed_tolerance: int = 10
    ws_ping_interval: float = 20.0
    ws_ping_timeout: float = 20.0
    device_compression: bool = False
    history_maxlen: int = 1000
    events_maxlen: int = 100_000
    dashboard_snapshot_limit: int = 10_000
    dashboard_batch_interval: float = 0.05  # ≤ 20 frames/s per dashboard, ≤ 50 ms waiting
    fleet_sample_interval: int = 10  # seconds between two points of the fleet-counts series
    fleet_sampling: bool = True  # off: this process only reads the series others write
    handshake_timeout: float = 5.0  # a new connection's whole request or upgrade, seconds
    max_connections: int = 0  # 0: the file-descriptor limit less a reserve
    max_pending_per_address: int = 0  # 0: no limit per source address
    # commands (gateway/commands/): pending per device, and how long final ones are kept
    command_queue_max: int = 100
    command_retention: float = 86400.0
    # the SSE event stream (gateway/eventstream.py)
    events_stream_keepalive: float = 15.0  # seconds between keep-alive comments
    events_stream_queue: int = 1000  # frames queued per reader before it is cut off
    events_stream_max_readers: int = 1000  # SSE readers per process
    # webhooks (gateway/webhooks/)
    webhook_allow_private: bool = False  # loopback/private targets refused unless true (SSRF)
    webhook_timeout: float = 10.0  # seconds a target has to answer one POST
    webhook_retry_base: float = 1.0  # first retry's delay; doubled each time, with jitter
    webhook_retry_max_delay: float = 3600.0  # longest delay between two attempts
    webhook_retry_limit: float = 86400.0  # seconds of failing before an endpoint is `failing`
    webhook_lease: float = 15.0  # seconds a crashed process holds an endpoint's delivery
    webhook_max_endpoints: int = 100
    log_level: str = "info"
    # where people reach the gateway, for the start-up banner (default: from host and port)
    public_url: str | None = None
    new_admin_key: bool = False  # `--new-admin-key` only: no environment variable
    # MQTT devices through a broker (gateway/mqtt/): off without a URL
    mqtt_url: str | None = None
    mqtt_username: str | None = None
    mqtt_password: str | None = field(default=None, repr=False)
    mqtt_topic_prefix: str = "devices"
    mqtt_share_group: str = "gateway"  # every process of one deployment shares its messages
    extra: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.host:
            raise ConfigError("the bind address is empty", "host")
        if not 1 <= self.port <= 65535:
            raise ConfigError(f"a port is 1–65535, got {self.port}", "port")
        if self.redis_url is not None:
            check_redis_url(self.redis_url)
        if self.seed_schema not in SEED_SCHEMAS:
            raise ConfigError(
                f"must be one of {', '.join(SEED_SCHEMAS)}; got {self.seed_schema!r}", "seed_schema"
            )
        if not 1 <= self.cluster_partitions <= 4096:
            raise ConfigError(
                f"must be 1–4096, got {self.cluster_partitions}", "cluster_partitions"
            )
        if not 0.1 <= self.pubsub_probe_interval <= 300:
            raise ConfigError(
                f"must be 0.1–300 seconds, got {self.pubsub_probe_interval}",
                "pubsub_probe_interval",
            )
        if not PREFIX_PATTERN.fullmatch(self.key_prefix):
            raise ConfigError(
                f"up to 64 of A-Z a-z 0-9 . _ : -; got {self.key_prefix[:80]!r}", "key_prefix"
            )
        if self.log_level.lower() not in LOG_LEVELS:
            raise ConfigError(
                f"log level must be one of {', '.join(LOG_LEVELS)}; got {self.log_level!r}",
                "log_level",
            )
        if self.heartbeat_timeout < 1:
            raise ConfigError(
                f"heartbeat timeout must be at least 1 s, got {self.heartbeat_timeout}",
                "heartbeat_timeout",
            )
        if self.offline_grace < 0:
            raise ConfigError(
                f"offline grace must be ≥ 0, got {self.offline_grace}", "offline_grace"
            )
        if not 0.001 <= self.batch_interval <= 0.02:
            raise ConfigError(
                f"batch interval must be 1–20 ms, got {self.batch_interval * 1000:g} ms",
                "batch_interval",
            )
        if self.max_frame_bytes < 1024:
            raise ConfigError(
                f"max frame bytes must be ≥ 1024, got {self.max_frame_bytes}", "max_frame_bytes"
            )
        if not 1 <= self.fleet_sample_interval <= 3600:
            raise ConfigError(
                f"must be 1–3600 seconds, got {self.fleet_sample_interval}",
                "fleet_sample_interval",
            )
        if not 0.1 <= self.handshake_timeout <= 300:
            raise ConfigError(
                f"must be 0.1–300 seconds, got {self.handshake_timeout}", "handshake_timeout"
            )
        if not 1 <= self.command_queue_max <= 10_000:
            raise ConfigError(
                f"must be 1–10000 commands, got {self.command_queue_max}", "command_queue_max"
            )
        if not 1 <= self.command_retention <= 30 * 86400:
            raise ConfigError(
                f"must be 1–2592000 seconds (30 days), got {self.command_retention}",
                "command_retention",
            )
        if self.mqtt_url is not None:
            check_mqtt_url(self.mqtt_url)
        if not MQTT_PREFIX_PATTERN.fullmatch(self.mqtt_topic_prefix):
            raise ConfigError(
                f"topic levels of A-Z a-z 0-9 . _ - joined by /, got {self.mqtt_topic_prefix!r}",
                "mqtt_topic_prefix",
            )
        if not PREFIX_PATTERN.fullmatch(self.mqtt_share_group) or not self.mqtt_share_group:
            raise ConfigError(
                f"1–64 of A-Z a-z 0-9 . _ : -; got {self.mqtt_share_group[:80]!r}",
                "mqtt_share_group",
            )
        if not 0.05 <= self.events_stream_keepalive <= 300:
            raise ConfigError(
                f"must be 0.05–300 seconds, got {self.events_stream_keepalive}",
                "events_stream_keepalive",
            )
        limits = (
            ("events_stream_queue", 1_000_000),
            ("events_stream_max_readers", 100_000),
            ("webhook_max_endpoints", 10_000),
        )
        for name, top in limits:
            if not 1 <= getattr(self, name) <= top:
                raise ConfigError(f"must be 1–{top}, got {getattr(self, name)}", name)
        for name, low, high in (
            ("webhook_timeout", 0.1, 60.0),
            ("webhook_retry_base", 0.01, 3600.0),
            ("webhook_retry_max_delay", 0.01, 86400.0),
            ("webhook_retry_limit", 0.1, 30 * 86400.0),
            ("webhook_lease", 0.5, 600.0),
        ):
            if not low <= getattr(self, name) <= high:
                raise ConfigError(
                    f"must be {low:g}–{high:g} seconds, got {getattr(self, name)}", name
                )
        for name, zero in (
            ("max_connections", "derived from the file-descriptor limit"),
            ("max_pending_per_address", "no limit"),
        ):
            if getattr(self, name) < 0:
                raise ConfigError(f"must be ≥ 0 (0: {zero}), got {getattr(self, name)}", name)

    @property
    def ttl_ms(self) -> int:
        return int(self.heartbeat_timeout * 1000)

    @property
    def command_retention_s(self) -> int:
        """Seconds a final command is kept, whole (what Redis EXPIRE takes)."""
        return max(1, math.ceil(self.command_retention))

    def with_overrides(self, **changes: Any) -> Settings:
        """A copy with the given non-None values applied (CLI flags over environment)."""
        return replace(self, **{k: v for k, v in changes.items() if v is not None})


# environment variable → (field, parser)
def _csv(value: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in value.split(",") if part.strip())


def _bool(value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off", ""}:
        return False
    raise ConfigError(f"expected a boolean, got {value!r}")


_PARSERS: dict[type | str, Any] = {
    "int": int,
    "float": float,
    "str": str,
    "str | None": str,
    "Path": Path,
    "bool": _bool,
    "tuple[str, ...]": _csv,
}

PLATFORM_VARIABLES = {"REDIS_URL": "redis_url", "PORT": "port"}
CLI_ONLY = frozenset({"new_admin_key", "extra"})


def env_name(field_name: str) -> str:
    return PLATFORM_VARIABLES_INVERSE.get(field_name, f"GATEWAY_{field_name.upper()}")


PLATFORM_VARIABLES_INVERSE = {v: k for k, v in PLATFORM_VARIABLES.items()}


def from_env(environ: Mapping[str, str] | None = None) -> Settings:
    """Settings from `environ` (default: the process environment)."""
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for f in fields(Settings):
        if f.name in CLI_ONLY:
            continue
        name = env_name(f.name)
        raw = env.get(name)
        if raw is None or raw == "":
            continue
        parser = _PARSERS.get(str(f.type))
        if parser is None:  # pragma: no cover - a new field without a parser
            raise ConfigError(f"no parser for setting {f.name} ({f.type})")
        try:
            values[f.name] = parser(raw)
        except ConfigError as exc:
            raise ConfigError(str(exc), f.name) from exc
        except ValueError as exc:
            expected = _EXPECTED.get(str(f.type), "a valid value")
            raise ConfigError(f"expected {expected}, got {raw!r}", f.name) from exc
    return Settings(**values)


_EXPECTED = {"int": "an integer", "float": "a number"}


def check_redis_url(url: str) -> None:
    """Refuse what redis-py would misread: `localhost:6379` parses as scheme `localhost`."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme in ("redis+cluster", "rediss+cluster"):
        from gateway.redisconn import ClusterUrl  # the one parser of cluster URLs

        try:
            ClusterUrl.parse(url)
        except ValueError as exc:
            raise ConfigError(str(exc), "redis_url") from None
        return
    if parts.scheme not in REDIS_SCHEMES or (parts.scheme != "unix" and not parts.hostname):
        raise ConfigError(
            f"{url!r} is not a Redis URL; write it as redis://HOST:PORT/DB "
            "(rediss:// for TLS, unix:///path/to/socket, redis+cluster://HOST:PORT,HOST:PORT "
            "for a cluster)",
            "redis_url",
        )
    try:
        _ = parts.port  # a port that is not a number raises here
    except ValueError:
        raise ConfigError(f"{url!r} has a port that is not a number", "redis_url") from None
    database = parts.path.strip("/")
    if parts.scheme != "unix" and database and not database.isdigit():
        raise ConfigError(f"{url!r}: the database after the / must be a number", "redis_url")


def check_mqtt_url(url: str) -> None:
    """`mqtt://host[:port]` or `mqtts://host[:port]`; anything else names `--mqtt-url`."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in MQTT_SCHEMES:
        raise ConfigError(f"{url[:80]!r} must start with mqtt:// or mqtts://", "mqtt_url")
    if not parts.hostname:
        raise ConfigError(f"{url[:80]!r} names no host", "mqtt_url")
    try:
        _ = parts.port
    except ValueError:
        raise ConfigError(f"{url[:80]!r} has a port that is not a number", "mqtt_url") from None
    if parts.path not in ("", "/") or parts.query:
        raise ConfigError(f"{url[:80]!r}: only a host and a port, no path", "mqtt_url")
