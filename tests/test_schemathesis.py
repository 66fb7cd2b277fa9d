"""Schemathesis against `/openapi.json` of a live gateway process: no 500, every response as
the schema says (status codes, content types, bodies, headers).

Needs `schemathesis` (add it to pyproject's `test` extra); a bounded number of examples per
operation keeps it quick.
"""

from __future__ import annotations

from typing import Any

import schemathesis
from hypothesis import HealthCheck, given, settings
from live import ADMIN_KEY
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

EXAMPLES_PER_OPERATION = 30
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]


def test_every_operation_conforms_to_the_openapi_document(
    redis_url: str, gateway_factory: Any
) -> None:
    gw = gateway_factory(redis_url)
    schema = schemathesis.openapi.from_url(f"{gw.base_url}/openapi.json")
    headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 10, [op.label for op in operations]
    failures: list[str] = []
    for operation in operations:

        @settings(
            max_examples=EXAMPLES_PER_OPERATION,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        @given(case=operation.as_strategy())
        def check(case: Any) -> None:
            case.call_and_validate(base_url=gw.base_url, headers=headers, checks=CHECKS)

        try:
            check()
        except Exception as exc:  # collect every operation's failure, then report them all
            failures.append(f"{operation.label}: {str(exc)[:1500]}")
    assert "Traceback" not in gw.log_text(), gw.log_text()[-3000:]
    assert not failures, "\n\n".join(failures)
