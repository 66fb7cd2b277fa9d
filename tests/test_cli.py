"""The README's commands, word for word, as a newcomer meets them.

`gateway serve` runs from an empty working directory with no configuration (the relative default
data directory, an embedded Redis, a generated admin key), is stopped the two ways people stop
servers, and starts again on the same data. Each start-up mistake is one line naming the flag,
with nothing left running. The only setting the tests give is `PORT`, so they can run beside a
real gateway on 8000.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import ADMIN_KEY, GatewayFactory
from servers import skip_or_fail

from gateway.embedded import find_free_port

README = Path(__file__).resolve().parents[1] / "README.md"
GATEWAY = Path(sys.executable).with_name("gateway")
START_TIMEOUT = 20.0
STOP_TIMEOUT = 20.0
KEY_LINE = re.compile(r"^\s{4}([A-Za-z0-9_-]{40,})$", re.MULTILINE)


def readme_blocks(heading: str) -> list[str]:
    """The fenced code blocks of one README section, dedented as a reader copies them."""
    text = README.read_text()
    section = text.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"^( *)```sh\n(.*?)^\1```$", section, re.MULTILINE | re.DOTALL)
    return ["\n".join(line[len(indent) :] for line in body.splitlines()) for indent, body in blocks]


def readme_run_command() -> list[str]:
    (block,) = readme_blocks("Run it")
    install, _, run = block.strip().partition(" && ")
    assert install == "pip install -e ."  # the run command installs only what running needs
    words = run.split()
    assert words[0] == "gateway", block
    return [str(GATEWAY), *words[1:]]


def clean_env(**extra: str) -> dict[str, str]:
    """The test's environment without any gateway configuration."""
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith("GATEWAY_") and name not in {"REDIS_URL", "PORT"}
    }
    return env | extra


def processes_working_in(directory: Path) -> list[int]:
    """Live processes whose working directory is *directory* (valkey chdirs to its data dir)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if Path(os.readlink(entry / "cwd")) == directory:
                state = (entry / "stat").read_text().rpartition(")")[2].split()[0]
                if state != "Z":
                    found.append(int(entry.name))
        except OSError:
            continue
    return found


class ServedGateway:
    """`gateway serve` as the README runs it, in its own process group like a terminal job."""

    def __init__(self, workdir: Path, port: int, *args: str) -> None:
        self.workdir = workdir
        self.port = port
        self.output_path = workdir / f"gateway-{time.monotonic_ns()}.out"
        with open(self.output_path, "wb") as output:
            self.process = subprocess.Popen(
                [*readme_run_command(), *args],
                cwd=workdir,
                env=clean_env(PORT=str(port)),
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def output(self) -> str:
        return self.output_path.read_text(errors="replace")

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"gateway exited with {self.process.returncode}:\n{self.output()}")
            try:
                with urllib.request.urlopen(self.url("/readyz"), timeout=1) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.1)
        self.process.kill()
        pytest.fail(f"gateway not ready after {START_TIMEOUT}s:\n{self.output()}")

    def admin_key(self) -> str:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            found = KEY_LINE.findall(self.output())
            if found:
                return str(found[-1])
            time.sleep(0.05)
        pytest.fail(f"no generated admin key printed:\n{self.output()}")

    def request(self, method: str, path: str, key: str, body: object = None) -> tuple[int, object]:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url(path), data=data, method=method)
        request.add_header("Authorization", f"Bearer {key}")
        if data is not None:
            request.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                return response.status, json.loads(response.read() or b"null")
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read() or b"null")

    def stop(self, signum: signal.Signals) -> int:
        """Ctrl-C reaches the whole foreground process group; SIGTERM only the gateway."""
        if signum == signal.SIGINT:
            os.killpg(self.process.pid, signum)
        else:
            self.process.send_signal(signum)
        try:
            return self.process.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.process.kill()
            pytest.fail(f"gateway did not stop on {signum.name}:\n{self.output()}")

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


@pytest.fixture
def workdir(tmp_path: Path) -> Iterator[Path]:
    """An empty directory to run in; whatever a test leaves running there is stopped after."""
    directory = tmp_path / "empty"
    directory.mkdir()
    yield directory
    for pid in processes_working_in(directory / "data"):
        os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_run_command_from_an_empty_directory_stops_cleanly_and_keeps_the_data(
    workdir: Path, signum: signal.Signals
) -> None:
    port = find_free_port()
    first = ServedGateway(workdir, port)
    first.wait_ready()
    key = first.admin_key()
    status, created = first.request(
        "POST", "/api/devices", key, {"device_id": "sensor-1", "device_type": "thermo"}
    )
    assert status == 201, created
    assert "Dashboard: http://127.0.0.1:" in first.output()

    assert first.stop(signum) == 0, first.output()
    assert "Traceback" not in first.output()
    assert "embedded Redis stopped (exit code 0)" in first.output()
    assert processes_working_in(workdir / "data") == []
    assert list((workdir / "data" / "appendonlydir").glob("appendonly.aof.*.incr.aof"))

    second = ServedGateway(workdir, port)
    second.wait_ready()
    status, device = second.request("GET", "/api/devices/sensor-1", key)
    assert status == 200 and isinstance(device, dict), device
    assert device["device_type"] == "thermo"
    assert KEY_LINE.search(second.output()) is None  # shown once, at the first start only
    assert "--new-admin-key" in second.output()  # and the way to get a new one is said
    assert second.stop(signum) == 0, second.output()
    assert "Traceback" not in second.output()
    assert processes_working_in(workdir / "data") == []


def test_a_lost_admin_key_is_replaced_by_new_admin_key(workdir: Path) -> None:
    port = find_free_port()
    first = ServedGateway(workdir, port)
    first.wait_ready()
    lost = first.admin_key()
    assert first.stop(signal.SIGTERM) == 0
    second = ServedGateway(workdir, port, "--new-admin-key")
    second.wait_ready()
    replacement = second.admin_key()
    assert replacement != lost
    assert second.request("GET", "/api/stats", lost)[0] == 401
    assert second.request("GET", "/api/stats", replacement)[0] == 200
    assert second.stop(signal.SIGTERM) == 0


def test_a_second_start_on_the_same_data_directory_is_one_line(workdir: Path) -> None:
    running = ServedGateway(workdir, find_free_port())
    running.wait_ready()
    try:
        owner = processes_working_in(workdir / "data")
        result = run_gateway(workdir, find_free_port())
        assert_one_line(result, "--data-dir")
        assert "another gateway" in result.stderr
        assert processes_working_in(workdir / "data") == owner
    finally:
        running.stop(signal.SIGTERM)


def test_a_taken_port_is_one_line_naming_the_port(workdir: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        result = run_gateway(workdir, taken.getsockname()[1])
    assert_one_line(result, "--port / PORT")
    assert "already in use" in result.stderr
    assert processes_working_in(workdir / "data") == []


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--redis-url", "localhost:6379"], "--redis-url / REDIS_URL"),
        (["--log-level", "loud"], "--log-level / GATEWAY_LOG_LEVEL"),
        (["--port", "99999"], "--port / PORT"),
        (["--port", "eighty"], "--port"),
        (["--heartbeat-timeout", "0"], "--heartbeat-timeout / GATEWAY_HEARTBEAT_TIMEOUT"),
        (["--data-dir", "a-file"], "--data-dir / GATEWAY_DATA_DIR"),
        (["--data-dir", "a-file/below-a-file"], "--data-dir / GATEWAY_DATA_DIR"),
        (["--ssl-certfile", "missing.pem", "--ssl-keyfile", "missing.pem"], "--ssl-certfile"),
        (["--no-such-flag"], "--no-such-flag"),
    ],
)
def test_a_start_up_mistake_is_one_line_naming_the_flag(
    workdir: Path, args: list[str], named: str
) -> None:
    (workdir / "a-file").write_text("not a directory")
    result = run_gateway(workdir, find_free_port(), *args)
    assert_one_line(result, named)
    assert processes_working_in(workdir / "a-file") == []
    assert not (workdir / "data").exists()  # nothing was started, not even a data directory


def run_gateway(workdir: Path, port: int, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*readme_run_command(), *args],
        cwd=workdir,
        env=clean_env(PORT=str(port)),
        capture_output=True,
        text=True,
        timeout=START_TIMEOUT,
        check=False,
    )


def assert_one_line(result: subprocess.CompletedProcess[str], named: str) -> None:
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("gateway: ") and named in lines[0], lines[0]
    assert "Traceback" not in result.stdout + result.stderr


def test_the_readme_device_steps_show_a_desired_change_and_a_command_result(
    redis_url: str, gateway_factory: GatewayFactory
) -> None:
    if shutil.which("curl") is None:
        skip_or_fail("curl not found (apt-get install curl): the README's steps use it")
    register, device_code, change, command = readme_blocks("Try a device")
    gateway = gateway_factory(redis_url)

    def local(block: str) -> str:
        return block.replace(":8000", f":{gateway.port}")

    # as in the README's virtualenv: its `python` is the one on PATH
    path = f"{GATEWAY.parent}{os.pathsep}{os.environ.get('PATH', '')}"
    env = clean_env(KEY=ADMIN_KEY, PATH=path)
    created = subprocess.run(
        ["bash", "-c", local(register)], env=env, capture_output=True, text=True, check=True
    )
    env["TOKEN"] = json.loads(created.stdout)["token"]
    output = gateway.log_path.with_name("device.out")
    with open(output, "w") as sink:
        device = subprocess.Popen(
            ["bash", "-c", local(device_code)], env=env, stdout=sink, stderr=subprocess.STDOUT
        )
    try:
        wait_for_line(output, "reported, shadow version", device)
        subprocess.run(["bash", "-c", local(change)], env=env, capture_output=True, check=True)
        expected = "desired: {'interval': 30} to do: {'interval': {'desired': 30, 'reported': 60}}"
        wait_for_line(output, expected, device)
        assert expected in " ".join(README.read_text().split())
        answered = subprocess.run(
            ["bash", "-c", local(command)], env=env, capture_output=True, text=True, check=True
        )
        finished = json.loads(answered.stdout)
        assert finished["status"] == "succeeded" and finished["result"] == {"celsius": 21.5}
        wait_for_line(output, "command: read {}", device)
        prose = " ".join(README.read_text().split())
        assert '`"status":"succeeded"` and `"result":{"celsius":21.5}`' in prose
    finally:
        device.terminate()
        device.wait(timeout=10)


def wait_for_line(path: Path, text: str, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if text in path.read_text():
            return
        if process.poll() is not None:
            break
        time.sleep(0.05)
    pytest.fail(f"{text!r} not printed by the README's device:\n{path.read_text()}")
