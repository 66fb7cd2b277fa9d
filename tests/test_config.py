"""Settings from the environment (§3): platform names, GATEWAY_ names, and refusals."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.config import ConfigError, Settings, env_name, from_env


def test_defaults_with_an_empty_environment() -> None:
    settings = from_env({})
    assert settings == Settings()
    assert settings.redis_url is None
    assert settings.heartbeat_timeout == 60.0
    assert settings.key_prefix == ""
    assert settings.ttl_ms == 60_000


def test_platform_variables_have_no_prefix() -> None:
    settings = from_env({"REDIS_URL": "redis://h:1/3", "PORT": "9999"})
    assert settings.redis_url == "redis://h:1/3"
    assert settings.port == 9999
    assert env_name("redis_url") == "REDIS_URL"
    assert env_name("port") == "PORT"
    assert env_name("api_key") == "GATEWAY_API_KEY"


def test_prefixed_variables_of_every_type() -> None:
    settings = from_env(
        {
            "GATEWAY_API_KEY": "secret",
            "GATEWAY_READ_API_KEYS": " r1, r2 ,,r3 ",
            "GATEWAY_HEARTBEAT_TIMEOUT": "2.5",
            "GATEWAY_ALLOWED_ORIGINS": "http://a,http://b",
            "GATEWAY_DEVICE_COMPRESSION": "yes",
            "GATEWAY_DATA_DIR": "/tmp/x",
            "GATEWAY_MAX_DEPTH": "4",
            "GATEWAY_KEY_PREFIX": "t1:",
            "GATEWAY_OFFLINE_GRACE": "0.5",
        }
    )
    assert settings.api_key == "secret"
    assert settings.read_api_keys == ("r1", "r2", "r3")
    assert settings.heartbeat_timeout == 2.5
    assert settings.ttl_ms == 2500
    assert settings.allowed_origins == ("http://a", "http://b")
    assert settings.device_compression is True
    assert settings.data_dir == Path("/tmp/x")
    assert settings.max_depth == 4
    assert settings.key_prefix == "t1:"
    assert settings.offline_grace == 0.5


def test_unprefixed_names_other_than_the_platforms_are_ignored() -> None:
    assert from_env({"HEARTBEAT_TIMEOUT": "5", "API_KEY": "x"}) == Settings()


def test_empty_values_mean_unset() -> None:
    assert from_env({"PORT": "", "GATEWAY_HEARTBEAT_TIMEOUT": ""}) == Settings()


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("PORT", "eighty", "PORT"),
        ("GATEWAY_HEARTBEAT_TIMEOUT", "soon", "GATEWAY_HEARTBEAT_TIMEOUT"),
        ("GATEWAY_DEVICE_COMPRESSION", "maybe", "expected a boolean"),
        ("GATEWAY_HEARTBEAT_TIMEOUT", "0.5", "at least 1 s"),
        ("GATEWAY_OFFLINE_GRACE", "-1", "offline grace"),
        ("GATEWAY_BATCH_INTERVAL", "0.5", "batch interval"),
        ("GATEWAY_MAX_FRAME_BYTES", "10", "max frame bytes"),
        ("PORT", "99999", "--port / PORT: a port is 1–65535"),
        ("REDIS_URL", "localhost:6379", "--redis-url / REDIS_URL: 'localhost:6379' is not a Redis"),
        ("REDIS_URL", "redis://h:1/x", "database after the / must be a number"),
        ("GATEWAY_LOG_LEVEL", "loud", "--log-level / GATEWAY_LOG_LEVEL: log level must be one of"),
    ],
)
def test_bad_values_raise_config_error_naming_the_problem(
    name: str, value: str, message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        from_env({name: value})


@pytest.mark.parametrize("value", ["1", "true", "YES", "on"])
def test_booleans_true(value: str) -> None:
    assert from_env({"GATEWAY_DEVICE_COMPRESSION": value}).device_compression is True


@pytest.mark.parametrize("value", ["0", "false", "No", "off"])
def test_booleans_false(value: str) -> None:
    assert from_env({"GATEWAY_DEVICE_COMPRESSION": value}).device_compression is False


def test_overrides_apply_only_given_values() -> None:
    base = from_env({"GATEWAY_API_KEY": "env", "PORT": "1234"})
    merged = base.with_overrides(api_key="flag", port=None, heartbeat_timeout=5.0)
    assert (merged.api_key, merged.port, merged.heartbeat_timeout) == ("flag", 1234, 5.0)
    with pytest.raises(ConfigError):
        base.with_overrides(heartbeat_timeout=0.1)


def test_settings_are_frozen() -> None:
    settings = Settings()
    with pytest.raises(AttributeError):
        settings.port = 1  # type: ignore[misc]


def test_process_environment_is_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY_HEARTBEAT_TIMEOUT", "7")
    assert from_env().heartbeat_timeout == 7.0


@pytest.mark.parametrize(
    "url", ["redis://h:1/3", "rediss://user:pw@h:6380/0", "unix:///run/redis.sock", "redis://h"]
)
def test_redis_urls_of_every_kind_are_accepted(url: str) -> None:
    assert from_env({"REDIS_URL": url}).redis_url == url


def test_log_levels_are_case_blind() -> None:
    assert from_env({"GATEWAY_LOG_LEVEL": "DEBUG"}).log_level == "DEBUG"


def test_new_admin_key_has_no_environment_variable() -> None:
    assert from_env({"GATEWAY_NEW_ADMIN_KEY": "true"}).new_admin_key is False
