"""Fuzz the served OpenAPI document with schemathesis (bounded): whatever the body, headers or
path, the gateway answers without a 5xx, and every 4xx is in OpenAI's error shape.

Auth and rate limits are on, so generated requests cross the whole pipeline; most carry a valid
key so their bodies reach validation, the rest reach the 401 path."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import jwt
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode

from tests.live import LiveServer, serve, settings_from
from tests.ops.helpers import config, is_openai_error

ENV = "AIBOX_FUZZ_JWT_SECRET"
SECRET = "fuzz-secret-0123456789-0123456789-abcdef"  # test-only HS256 key


@pytest.fixture(scope="module")
def server() -> Iterator[LiveServer]:
    os.environ[ENV] = SECRET
    doc = config(
        server={"max_tokens_cap": 64, "request_timeout_s": 5.0},
        auth={"enabled": True, "secret_env": ENV, "dev_generate_secret": False},
        ratelimit={"store": "memory", "tiers": {"default": {"principal": {"requests_per_minute": 100_000}}}},
    )
    try:
        with serve(settings_from(doc)) as live:
            yield live
    finally:
        os.environ.pop(ENV, None)


@pytest.fixture(scope="module")
def api_key() -> str:
    return jwt.encode({"sub": "fuzzer", "exp": int(time.time()) + 3600}, SECRET, algorithm="HS256")


def operations(server: LiveServer) -> list[schemathesis.APIOperation]:
    """Every operation of the schema the server serves (loading it is part of the test)."""
    api = schemathesis.openapi.from_url(server.url + "/openapi/openapi.json")
    return [result.ok() for result in api.get_all_operations()]


# schemathesis' own pytest plugin (`from_fixture`) does not run under pytest 9, so the
# strategies are driven with hypothesis directly: same generators, same bounded examples.
@pytest.mark.slow
@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=["valid", "invalid"])
def test_no_server_errors_and_openai_shaped_4xx(server: LiveServer, api_key: str, mode: GenerationMode) -> None:
    ops = operations(server)
    assert {op.path for op in ops} >= {"/v1/chat/completions", "/v1/completions", "/v1/models"}
    if mode == GenerationMode.NEGATIVE:  # bodies are what can be invalid (path params are free strings)
        ops = [op for op in ops if op.method.upper() == "POST"]
    num_calls = 0
    statuses: dict[str, set[int]] = {}
    for op in ops:

        num_examples = 40 if op.method.upper() == "POST" else 10

        @settings(max_examples=num_examples, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True, database=None)
        # 0: no key; 1: key, generated model name; 2-3: key and the served model (reaches the backend)
        @given(case=op.as_strategy(mode), variant=st.integers(0, 3))
        def check(case: schemathesis.Case, variant: int) -> None:
            nonlocal num_calls
            headers = {"authorization": f"Bearer {api_key}"} if variant else {}
            if variant >= 2 and isinstance(case.body, dict) and isinstance(case.body.get("model"), str):
                case.body["model"] = "m"  # a random name is a 404; this one reaches the backend
            response = case.call(headers=headers, timeout=10)
            num_calls += 1
            statuses.setdefault(case.path, set()).add(response.status_code)
            where = f"{case.method} {case.formatted_path} body={case.body!r:.200} -> {response.status_code}: {response.text[:300]}"
            assert response.status_code < 500, where
            if response.status_code >= 400:
                assert is_openai_error(response.json()), where

        check()
    assert num_calls >= 40 * 2
    assert {400, 401} <= statuses["/v1/chat/completions"], statuses  # validation and auth paths reached
    if mode == GenerationMode.POSITIVE:  # schema-valid bodies get through to the backend
        assert 200 in statuses["/v1/chat/completions"] and 200 in statuses["/v1/completions"], statuses
