"""Settings: the one reader of the environment.

Every option has a CLI flag and an environment variable. Platforms set `REDIS_URL` and
`PORT`; everything else is prefixed `GATEWAY_`. Settings are frozen once built, so every
module sees the same values for the life of the process.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A setting has a value the gateway cannot run with."""


@dataclass(frozen=True)
class Settings:
    host: str = "127.0.0.1"
    port: int = 8000
    redis_url: str | None = None
    data_dir: Path = Path("data")
    key_prefix: str = ""
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
    handshake_timeout: float = 5.0  # a new connection's whole request or upgrade, seconds
    max_connections: int = 0  # 0: the file-descriptor limit less a reserve
    max_pending_per_address: int = 0  # 0: no limit per source address
    log_level: str = "info"
    extra: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.heartbeat_timeout < 1:
            raise ConfigError(
                f"heartbeat timeout must be at least 1 s, got {self.heartbeat_timeout}"
            )
        if self.offline_grace < 0:
            raise ConfigError(f"offline grace must be ≥ 0, got {self.offline_grace}")
        if not 0.001 <= self.batch_interval <= 0.02:
            raise ConfigError(
                f"batch interval must be 1–20 ms, got {self.batch_interval * 1000} ms"
            )
        if self.max_frame_bytes < 1024:
            raise ConfigError(f"max frame bytes must be ≥ 1024, got {self.max_frame_bytes}")
        if not 0.1 <= self.handshake_timeout <= 300:
            raise ConfigError(
                f"{env_name('handshake_timeout')} must be 0.1–300 seconds, "
                f"got {self.handshake_timeout}"
            )
        for name, zero in (
            ("max_connections", "derived from the file-descriptor limit"),
            ("max_pending_per_address", "no limit"),
        ):
            if getattr(self, name) < 0:
                raise ConfigError(
                    f"{env_name(name)} must be ≥ 0 (0: {zero}), got {getattr(self, name)}"
                )

    @property
    def ttl_ms(self) -> int:
        return int(self.heartbeat_timeout * 1000)

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


def env_name(field_name: str) -> str:
    return PLATFORM_VARIABLES_INVERSE.get(field_name, f"GATEWAY_{field_name.upper()}")


PLATFORM_VARIABLES_INVERSE = {v: k for k, v in PLATFORM_VARIABLES.items()}


def from_env(environ: Mapping[str, str] | None = None) -> Settings:
    """Settings from `environ` (default: the process environment)."""
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for f in fields(Settings):
        if f.name == "extra":
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
        except ValueError as exc:
            raise ConfigError(f"{name}: {exc}") from exc
    return Settings(**values)
