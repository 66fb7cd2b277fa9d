"""Keep credentials out of every log line.

uvicorn logs each WebSocket path with its query string (`?token=…`), and the websockets
library logs request headers at debug level (`Authorization: Bearer …`). A record factory
rewrites every record once, whoever logs it, before any handler sees it.
"""

from __future__ import annotations

import logging
import re
from typing import Any

_PATTERNS = (
    (re.compile(r"([?&](?:token|api_key)=)[^&\s\"']+"), r"\1[redacted]"),
    # to the end of the line, but not again over what is already redacted
    (
        re.compile(r"(?i)\b((?:authorization|cookie|set-cookie)\s*[:=]\s*)(?!\[redacted\]).*"),
        r"\1[redacted]",
    ),
    (re.compile(r"(?i)(gateway_session=)[^;\s\"']+"), r"\1[redacted]"),
)
_installed = False


def redact(message: str) -> str:
    for pattern, replacement in _PATTERNS:
        message = pattern.sub(replacement, message)
    return message


def install() -> None:
    """Redact every log record from now on (idempotent)."""
    global _installed
    if _installed:
        return
    _installed = True
    previous = logging.getLogRecordFactory()

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        try:
            message = record.getMessage()
        except Exception:  # a broken format string: leave it for logging to report
            return record
        cleaned = redact(message)
        if cleaned == message:
            return record
        # Redact the arguments first: formatters that read them (uvicorn's access log unpacks
        # its five) keep working. Only a secret the arguments alone do not hold (one in the
        # format string, or across both) collapses the record into its cleaned text.
        if isinstance(record.args, tuple):
            record.args = tuple(redact(a) if isinstance(a, str) else a for a in record.args)
            message = record.getMessage()
            if redact(message) == message:
                return record
        record.msg, record.args = cleaned, ()
        return record

    logging.setLogRecordFactory(factory)
