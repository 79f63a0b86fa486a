"""schemathesis against the served /openapi.json: generated requests to every operation, with the
API key, valid ones and invalid ones; no 5xx, and every answer has a documented status, content type,
body schema and headers."""

from __future__ import annotations

import os
import time

import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.conftest import TEST_API_KEY
from tests.factories import make_campaign, make_customers

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    response_headers_conformance,
]
MODES = [GenerationMode.POSITIVE, GenerationMode.NEGATIVE]
# Examples per operation and mode; raise them locally for a longer hunt. The real pass generates its
# requests from the same schema, with the same seed, and sends them to PostgreSQL and Redis: it runs fewer.
MAX_EXAMPLES = int(os.environ.get("FUZZ_MAX_EXAMPLES", 25))
REAL_MAX_EXAMPLES = int(os.environ.get("FUZZ_REAL_MAX_EXAMPLES", 10))
DEADLINE_MS = 3000  # per example
FORM = "application/x-www-form-urlencoded"


def has_no_invalid_request(operation) -> bool:
    """An operation whose only input is a form body of any object (the providers' webhooks) has no invalid
    request to generate: all that is not an object cannot be sent as a form. schemathesis finds none only
    after a thousand draws (7-10 s an operation), so the negative mode is not run for it."""
    parameters = [*operation.path_parameters, *operation.headers, *operation.cookies, *operation.query]
    bodies = list(operation.body)
    return (
        not parameters
        and bool(bodies)
        and all(body.media_type == FORM and body.definition.get("schema") == {"type": "object"} for body in bodies)
    )


def test_api_conforms_to_its_openapi_document(live_server, backend):
    max_examples = MAX_EXAMPLES if backend == "fast" else min(MAX_EXAMPLES, REAL_MAX_EXAMPLES)
    # Rows for small generated ids to hit, so that not every request is a 404.
    make_customers(3)
    make_campaign()
    schema = schemathesis.openapi.from_url(f"{live_server}/openapi.json")
    headers = {"Authorization": f"Bearer {TEST_API_KEY}"}
    failures: dict[str, str] = {}
    operations = examples = 0
    started = time.monotonic()
    for result in schema.get_all_operations():
        operation = result.ok()
        operations += 1
        for mode in MODES:
            if mode is GenerationMode.NEGATIVE and has_no_invalid_request(operation):
                continue

            @settings(
                max_examples=max_examples,
                deadline=DEADLINE_MS,
                derandomize=True,
                database=None,
                suppress_health_check=list(HealthCheck),
            )
            @given(case=operation.as_strategy(generation_mode=mode))
            def run(case):
                nonlocal examples
                examples += 1
                case.call_and_validate(headers=headers, checks=CHECKS)

            try:
                run()
            except Unsatisfiable:
                # Nothing to make invalid in an operation without parameters or body (GET /health).
                assert mode is GenerationMode.NEGATIVE, operation.label
            except (Exception, BaseExceptionGroup) as exc:  # noqa: BLE001 - gather them all, then fail once
                failures[f"{operation.label} ({mode.value})"] = f"{type(exc).__name__}: {exc}"[:3000]
    print(f"schemathesis: {operations} operations, {examples} examples in {time.monotonic() - started:.1f}s")
    assert operations >= 13
    assert not failures, "\n\n".join(f"{label}:\n{text}" for label, text in failures.items())
