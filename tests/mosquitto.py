"""A private Mosquitto for tests, configured as docs/mqtt.md says: no anonymous clients, a
password file, and `pattern readwrite devices/%u/#` so a device (user name = device id) can
publish and read its own topics only; the gateway's user reads and writes every device's.

Blocking calls are fine here: they run in fixtures and helpers outside any event loop, or
are quick (a TCP connect).
"""

from __future__ import annotations

import contextlib
import getpass
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

import pytest
from servers import HOST, skip_or_fail

from gateway.embedded import find_free_port

MOSQUITTO = Path("/usr/sbin/mosquitto")
GATEWAY_USER, GATEWAY_PASSWORD = "gateway", "gateway-secret"
START_TIMEOUT = 10.0


def device_password(device_id: str) -> str:
    return f"pw-{device_id}"


ACL = """\
# the gateway: every device's topics
user gateway
topic readwrite devices/#

# each device (its user name is its id): its own topics only
pattern readwrite devices/%u/#
"""


class Mosquitto:
    """One broker process; `restart` keeps its port, so clients reconnect to the same place."""

    def __init__(self, users: Iterable[str], directory: Path | None = None) -> None:
        binary = MOSQUITTO if MOSQUITTO.exists() else shutil.which("mosquitto")
        password_tool = shutil.which("mosquitto_passwd")
        if binary is None or password_tool is None:
            skip_or_fail("mosquitto not installed (apt-get install mosquitto)")
        self.binary = Path(binary)
        self.directory = directory or Path(tempfile.mkdtemp(prefix="test-mosquitto-"))
        self.directory.mkdir(parents=True, exist_ok=True)
        self.port = find_free_port(HOST)
        self.url = f"mqtt://{HOST}:{self.port}"
        passwords = self.directory / "passwd"
        lines = [f"{GATEWAY_USER}:{GATEWAY_PASSWORD}"]
        lines += [f"{user}:{device_password(user)}" for user in users]
        passwords.write_text("\n".join(lines) + "\n")
        subprocess.run([password_tool, "-U", str(passwords)], check=True)  # hash in place
        (self.directory / "acl").write_text(ACL)
        self.config = self.directory / "mosquitto.conf"
        self.config.write_text(
            # as root, mosquitto drops to user `mosquitto`, who cannot read a private tmp dir
            f"user {getpass.getuser()}\n"
            f"listener {self.port} {HOST}\n"
            "allow_anonymous false\n"
            f"password_file {passwords}\n"
            f"acl_file {self.directory / 'acl'}\n"
            "persistence false\n"
            f"log_dest file {self.directory / 'mosquitto.log'}\n"
            "log_type error\nlog_type warning\nlog_type notice\n"
        )
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> Mosquitto:
        with open(self.directory / "stderr.log", "ab") as stderr:
            self._process = subprocess.Popen(
                [str(self.binary), "-c", str(self.config)],
                stdin=subprocess.DEVNULL,
                stdout=stderr,
                stderr=stderr,
            )
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                pytest.fail(f"mosquitto exited during startup:\n{self.log_text()}")
            with contextlib.suppress(OSError), socket.create_connection((HOST, self.port), 0.2):
                return self
            time.sleep(0.02)
        self.kill()
        pytest.fail(f"mosquitto did not listen within {START_TIMEOUT}s:\n{self.log_text()}")

    def kill(self) -> None:
        """SIGKILL: the broker crashes; nobody's Will is published."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGKILL)
            process.wait(timeout=10)

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def log_text(self) -> str:
        parts = [self.directory / "stderr.log", self.directory / "mosquitto.log"]
        return "\n".join(p.read_text(errors="replace") for p in parts if p.exists())
