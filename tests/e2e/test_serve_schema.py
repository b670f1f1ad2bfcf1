"""schemathesis against the served /openapi.json: generated requests to every operation, zero server errors."""
from __future__ import annotations

import pytest
from conftest import train_tiny_run

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, settings  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402

from melanoma.deploy.limits import DEFAULT_ALLOWED_HOSTS, ServeConfig  # noqa: E402
from melanoma.deploy.serve import create_app  # noqa: E402
from melanoma.runs.run import Run  # noqa: E402


@pytest.fixture(scope="module")
def api_schema(tmp_path_factory):
    run = Run.load(train_tiny_run(tmp_path_factory.mktemp("schema"))[1])
    # schemathesis calls an ASGI app as host "testserver"; it must be allowed, or every request would get 400
    config = ServeConfig(allowed_hosts=(*DEFAULT_ALLOWED_HOSTS, schemathesis.python.asgi.HOST))
    return schemathesis.openapi.from_asgi("/openapi.json", create_app(run, config))


def test_no_server_errors_on_any_operation(api_schema):
    from hypothesis import given

    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert {f"{op.method.upper()} {op.path}" for op in operations} >= {"GET /health", "HEAD /health",
                                                                       "GET /v1/model", "POST /v1/predict"}
    assert api_schema["/v1/model"]["GET"].Case().call().status_code == 200  # the generated requests get through
    for operation in operations:
        @given(case=operation.as_strategy())
        @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
        def no_server_error(case):
            case.call_and_validate(checks=[not_a_server_error])

        no_server_error()
