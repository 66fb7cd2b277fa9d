"""Schemathesis against `/openapi.json` of a live gateway process.

The document must hold every HTTP route of the app's route table. Valid requests (as the
document says) get no 500 and responses exactly as documented (status codes, content types,
bodies, headers); invalid ones (the document's negation) are refused with a 4xx, so the
limits the document states are the limits the gateway enforces. A bounded number of examples
per operation keeps it quick.
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, assume, given, settings
from live import ADMIN_KEY
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from starlette.routing import Route

from gateway.app import create_app
from gateway.config import Settings
from gateway.endpoints import api

EXAMPLES_PER_OPERATION = 30
CONFORMANCE = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]
# answers that stream until the client leaves: only their refusals are checked here
ENDLESS = {"GET /api/events/stream"}
REFUSAL = [not_a_server_error, negative_data_rejection, content_type_conformance]


def route_table(redis_url: str) -> set[str]:
    """Every HTTP operation of the app, as schemathesis labels them ("GET /api/stats")."""
    routes = create_app(Settings(redis_url=redis_url)).app.routes
    return {
        f"{method} {route.path}"
        for route in routes
        if isinstance(route, Route) and route.endpoint is not api.api_fallback
        for method in (route.methods or set()) - {"HEAD"}
    }


def vanishes_on_the_wire(case: Any) -> bool:
    """A negative case made invalid by a query parameter with no values: nothing of it is
    sent, so the request that arrives is a valid one (schemathesis still expects a refusal)."""
    return any(value == [] for value in (case.query or {}).values())


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_every_route_is_documented_and_answers_as_documented(
    redis_url: str, gateway_factory: Any, mode: GenerationMode
) -> None:
    gw = gateway_factory(redis_url)
    schema = schemathesis.openapi.from_url(f"{gw.base_url}/openapi.json")
    headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
    document = httpx.get(f"{gw.base_url}/openapi.json").json()
    documented = {f"{method.upper()} {path}" for path, item in document["paths"].items()
                  for method in item}  # fmt: skip
    assert documented == route_table(redis_url)
    operations = [result.ok() for result in schema.get_all_operations()]
    # all but the document itself, which schemathesis leaves alone
    assert {op.label for op in operations} == documented - {"GET /openapi.json"}
    checks = CONFORMANCE if mode is GenerationMode.POSITIVE else REFUSAL
    failures: list[str] = []
    for operation in operations:
        method, path = operation.label.split(" ", 1)
        described = document["paths"][path][method.lower()]
        if mode is GenerationMode.NEGATIVE and not (
            described["parameters"] or "requestBody" in described
        ):
            continue  # takes nothing, so nothing can be invalid
        if mode is GenerationMode.POSITIVE and operation.label in ENDLESS:
            continue  # a valid request never ends; tests/test_events_stream.py reads it

        @settings(
            max_examples=EXAMPLES_PER_OPERATION,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        @given(case=operation.as_strategy(mode))
        def check(case: Any) -> None:
            if mode is GenerationMode.NEGATIVE:
                assume(not vanishes_on_the_wire(case))
            case.call_and_validate(base_url=gw.base_url, headers=headers, checks=checks)

        try:
            check()
        except Exception as exc:  # collect every operation's failure, then report them all
            failures.append(f"{operation.label}: {str(exc)[:1500]}")
    assert "Traceback" not in gw.log_text(), gw.log_text()[-3000:]
    assert not failures, "\n\n".join(failures)
