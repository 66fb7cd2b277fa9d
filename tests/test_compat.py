"""The fence around other libraries' private parts: checked at start, refused in one line."""

from __future__ import annotations

import subprocess
import sys

from gateway import compat


def test_the_installed_libraries_have_everything_the_gateway_reaches_into() -> None:
    assert compat.missing() == []
    assert compat.untested() == []  # pyproject.toml admits only the tested versions


def test_a_library_without_a_part_the_gateway_uses_stops_start_up_in_one_line() -> None:
    program = (
        "from uvicorn.protocols.websockets.websockets_sansio_impl import "
        "WebSocketsSansIOProtocol as P\n"
        "del P.send_receive_event_to_app\n"
        "from gateway.cli import main\n"
        "main(['serve', '--port', '1'])\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "WebSocketsSansIOProtocol lacks send_receive_event_to_app" in lines[0]
    assert lines[0].startswith("gateway: ") and "pyproject.toml" in lines[0]
