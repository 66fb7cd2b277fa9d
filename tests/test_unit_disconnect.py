"""The close-code table: codes a peer may receive, reasons that map back, and the docs' tables."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from gateway import disconnect

pytestmark = pytest.mark.unit

DOCS = Path(__file__).resolve().parents[1] / "docs"
ROW = re.compile(r"^\| (\d{4}) \| `([a-z_0-9]+)`[^|]*\| ([^|]+) \|$", re.MULTILINE)
NEVER_SENT = {1004, 1005, 1006, 1015}  # RFC 6455 7.4.1: reserved, never in a close frame


def test_every_close_can_be_sent_and_its_reason_names_it_alone() -> None:
    for close in disconnect.TABLE:
        assert 1000 <= close.code <= 1014 or 4000 <= close.code <= 4999, close
        assert close.code not in NEVER_SENT, close
        assert len(close.reason.encode()) <= 123, close  # a close frame's reason limit
    reasons = [close.reason for close in disconnect.TABLE]
    assert len(set(reasons)) == len(reasons)


def test_a_kick_reason_maps_back_to_its_close_and_anything_else_to_policy() -> None:
    for close in disconnect.TABLE:
        assert disconnect.by_reason(close.reason) is close
    assert disconnect.by_reason("gibberish") is disconnect.POLICY


@pytest.mark.parametrize(
    ("code", "reason"),
    [
        (1000, "closed"),
        (1001, "closed"),  # going away: the device said bye
        (1005, "connection_lost"),
        (1006, "connection_lost"),
        (1011, "connection_lost"),
        (1002, "protocol_error"),
        (1007, "invalid_utf8"),
        (1009, "frame_too_large"),
        (4000, "closed"),
    ],
)
def test_a_session_ended_by_the_peer_gets_the_presence_reason_of_its_code(
    code: int, reason: str
) -> None:
    assert disconnect.ended_by(code) == reason


def test_an_unknown_protocol_close_is_an_internal_error() -> None:
    assert disconnect.protocol_close(1009) is disconnect.TOO_BIG
    assert disconnect.protocol_close(1234) is disconnect.INTERNAL


@pytest.mark.parametrize("doc", ["protocol.md", "dashboard.md"])
def test_the_documented_close_codes_are_the_table(doc: str) -> None:
    rows = ROW.findall((DOCS / doc).read_text())
    assert rows, f"no close-code table found in docs/{doc}"
    table = {(close.code, close.reason): close for close in disconnect.TABLE}
    for code, reason, reconnect in rows:
        close = table.get((int(code), reason))
        assert close is not None, (
            f"docs/{doc} documents {code} {reason}; the code has no such close"
        )
        assert close.reconnect == (not reconnect.lstrip("*").startswith("no")), (doc, code, reason)
