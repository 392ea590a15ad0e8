"""Auth and rate limits over real HTTP, as the OpenAI SDK sees them (fake backend, memory store)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jwt
import openai
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from gateway.cli import main as aibox
from tests.live import LiveServer, serve, settings_from
from tests.policies.test_auth import AUD, FORGED_HS, ISS, SECRET

ENV = "AIBOX_AUTH_HTTP_SECRET"
_RSA = rsa.generate_private_key(public_exponent=65537, key_size=2048)
_RSA_PEM = _RSA.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
SCRIPT = "one two three four five six seven eight nine ten. "


def token(sub: str, **claims: Any) -> str:
    payload = {"sub": sub, "exp": int(time.time()) + 600, "iss": ISS, "aud": AUD, "jti": f"jti-{sub}", **claims}
    return jwt.encode(payload, SECRET, algorithm="HS256")


@pytest.fixture(scope="module")
def config_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same [auth] revocation_path a running gateway and `aibox token revoke` share."""
    folder = tmp_path_factory.mktemp("auth-http")
    path = folder / "config.toml"
    path.write_text(f'[auth]\nsecret_env = "{ENV}"\nrevocation_path = "{folder / "revoked.db"}"\n[audit]\nenabled = false\n')
    return path


@pytest.fixture(scope="module")
def server(config_file: Path) -> Iterator[LiveServer]:
    limits = {"requests_per_minute": 1000, "tokens_per_minute": 1_000_000}
    doc = {
        "auth": {"secret_env": ENV, "issuer": ISS, "audience": AUD, "max_token_bytes": 2048,
                 "revocation_path": str(config_file.parent / "revoked.db")},
        "ratelimit": {
            "store": "memory",
            "tiers": {
                "default": {"principal": limits},
                "tiny": {"principal": {"requests_per_minute": 2}},
                "burst": {"principal": {"requests_per_minute": 5}},
                "tokens": {"principal": {"tokens_per_minute": 1000}},
            },
        },
        "audit": {"enabled": False},
        "backends": {"f": {"type": "fake", "script": SCRIPT, "context_length": 4096}},
        "models": [{"name": "m", "deployments": [{"backend": "f"}]}, {"name": "secret-model", "deployments": [{"backend": "f"}]}],
    }  # fmt: skip
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(ENV, SECRET)
        with serve(settings_from(doc)) as s:
            yield s


def client(server: LiveServer, api_key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=api_key, max_retries=0)


def chat(c: openai.OpenAI, model: str = "m", **kw: Any) -> Any:
    return c.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=kw.pop("max_tokens", 2), **kw)


@pytest.mark.parametrize(("token_factory", "fragment"), [r[1:] for r in FORGED_HS], ids=[r[0] for r in FORGED_HS])
def test_forged_tokens_get_401_with_openai_body(server: LiveServer, token_factory, fragment: str) -> None:
    forged = token_factory(_RSA, _RSA_PEM)
    with client(server, forged) as c, pytest.raises(openai.AuthenticationError) as info:
        chat(c)
    err = info.value
    assert err.status_code == 401 and err.code == "invalid_api_key"
    assert err.body["type"] == "authentication_error" and fragment.lower() in err.body["message"].lower()
    assert err.response.headers["www-authenticate"].startswith("Bearer")


def test_missing_key_is_401(server: LiveServer) -> None:
    r = httpx.post(server.url + "/v1/chat/completions", json={"model": "m", "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer")
    assert r.json()["error"]["type"] == "authentication_error"
    assert httpx.get(server.url + "/v1/models").status_code == 401


def test_scopes_give_403_and_filter_models(server: LiveServer) -> None:
    with client(server, token("scoped", scopes=["model:m"])) as c:
        assert [m.id for m in c.models.list().data] == ["m"]
        assert chat(c).choices[0].message.content
        with pytest.raises(openai.PermissionDeniedError) as info:
            chat(c, model="secret-model")
        assert info.value.status_code == 403
    with client(server, token("all", scopes=["*"])) as c:
        assert sorted(m.id for m in c.models.list().data) == ["m", "secret-model"]


def test_revocation_is_live_within_a_second(server: LiveServer, config_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    key = token("to-revoke")
    with client(server, key) as c:
        chat(c)
        assert aibox(["token", "revoke", "jti-to-revoke", "--config", str(config_file)]) == 0
        assert "revoked" in capsys.readouterr().out
        t0 = time.monotonic()
        while True:
            try:
                chat(c)
            except openai.AuthenticationError as exc:
                assert "revoked" in exc.message
                break
            assert time.monotonic() - t0 < 1.0, "revocation not effective within 1 s"
            time.sleep(0.05)


def test_rate_limit_429_and_headers(server: LiveServer) -> None:
    with client(server, token("tiny-user", tier="tiny")) as c:
        raw = c.chat.completions.with_raw_response.create(model="m", messages=[{"role": "user", "content": "a"}], max_tokens=1)
        assert raw.headers["x-ratelimit-limit-requests"] == "2"
        assert raw.headers["x-ratelimit-remaining-requests"] == "1"
        assert raw.headers["x-ratelimit-reset-requests"] == "30s"
        chat(c)
        with pytest.raises(openai.RateLimitError) as info:
            chat(c)
    err = info.value
    assert err.status_code == 429 and err.code == "rate_limit_exceeded" and err.body["type"] == "rate_limit_exceeded"
    headers = err.response.headers
    assert int(headers["retry-after"]) >= 1 and int(headers["retry-after-ms"]) > 1000
    assert headers["x-ratelimit-remaining-requests"] == "0"


def test_every_response_of_a_limited_tier_carries_token_headers(server: LiveServer) -> None:
    with client(server, token("headers-user")) as c:
        raw = c.chat.completions.with_raw_response.create(model="m", messages=[{"role": "user", "content": "a"}], max_tokens=1)
    assert raw.headers["x-ratelimit-limit-tokens"] == "1000000"
    assert raw.headers["x-ratelimit-limit-requests"] == "1000"
    assert raw.headers["x-ratelimit-reset-tokens"].endswith(("ms", "s"))


def test_concurrent_http_burst_never_overshoots(server: LiveServer) -> None:
    headers = {"authorization": "Bearer " + token("burst-user", tier="burst")}
    body = {"model": "m", "messages": [{"role": "user", "content": "a"}], "max_tokens": 1}

    async def fire() -> list[int]:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
            responses = await asyncio.gather(*(http.post("/v1/chat/completions", json=body, headers=headers) for _ in range(50)))
        return [r.status_code for r in responses]

    codes = asyncio.run(fire())
    assert codes.count(200) == 5 and codes.count(429) == 45


def test_token_budget_is_reconciled_with_real_usage(server: LiveServer) -> None:
    with client(server, token("tokens-user", tier="tokens")) as c:
        first = c.chat.completions.with_raw_response.create(model="m", messages=[{"role": "user", "content": "a"}], max_tokens=400)
        used = first.parse().usage.total_tokens
        remaining_1 = int(first.headers["x-ratelimit-remaining-tokens"])
        assert remaining_1 < 600 and used < 1000 - remaining_1  # reserved ~400+, used ~10
        second = c.chat.completions.with_raw_response.create(model="m", messages=[{"role": "user", "content": "a"}], max_tokens=400)
        remaining_2 = int(second.headers["x-ratelimit-remaining-tokens"])
    # the unused part of the first reservation came back: only its real usage is charged
    assert remaining_1 - used <= remaining_2 <= remaining_1 - used + 5


# --------------------------------------------------------------------------- shared Redis
def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _redis_gateway_config(folder: Path, redis_url: str, *, fail_open: bool) -> Path:
    path = folder / "config.toml"
    path.write_text(f"""
[auth]
secret_env = "{ENV}"
issuer = "{ISS}"
audience = "{AUD}"
[ratelimit]
store = "redis"
redis_url_env = "AIBOX_TEST_NO_SUCH_VAR"
redis_url = "{redis_url}"
fail_open = {str(fail_open).lower()}
[ratelimit.tiers.default]
principal = {{ requests_per_minute = 20 }}
[audit]
enabled = false
[backends.f]
type = "fake"
script = "{SCRIPT}"
[[models]]
name = "m"
deployments = [{{ backend = "f" }}]
""")
    return path


@pytest.mark.slow
def test_two_gateway_processes_share_limits_through_redis(redis_server, tmp_path: Path) -> None:
    """Two real `aibox serve` processes, one Redis: 60 concurrent requests, exactly 20 admitted."""
    import os
    import subprocess
    import sys

    config = _redis_gateway_config(tmp_path, redis_server.url, fail_open=True)
    ports = [_free_port(), _free_port()]
    env = {**os.environ, ENV: SECRET}
    root = Path(__file__).resolve().parents[2]
    logs = [tmp_path / f"gateway-{p}.log" for p in ports]  # a file, not a pipe: a full pipe would block the server
    log_files = [log.open("wb") for log in logs]
    procs = [
        subprocess.Popen([sys.executable, "-m", "gateway.cli", "serve", "--config", str(config), "--port", str(p)],
                         cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=f)  # fmt: skip
        for p, f in zip(ports, log_files, strict=True)
    ]
    try:
        deadline = time.monotonic() + 60
        for port, proc, log in zip(ports, procs, logs, strict=True):
            while True:
                assert proc.poll() is None, log.read_text(errors="replace")[-3000:]
                try:
                    if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=1).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline, "gateway did not become ready"
                time.sleep(0.1)
        headers = {"authorization": "Bearer " + token("shared-user")}
        body = {"model": "m", "messages": [{"role": "user", "content": "a"}], "max_tokens": 1}

        async def fire() -> list[int]:
            async with httpx.AsyncClient(timeout=30) as http:
                calls = [http.post(f"http://127.0.0.1:{ports[i % 2]}/v1/chat/completions", json=body, headers=headers) for i in range(60)]
                return [r.status_code for r in await asyncio.gather(*calls)]

        codes = asyncio.run(fire())
        assert codes.count(200) == 20 and codes.count(429) == 40, codes
        redis_server.stop()  # outage with fail_open = true: requests are admitted, not failed
        r = httpx.post(f"http://127.0.0.1:{ports[0]}/v1/chat/completions", json=body, headers=headers)
        assert r.status_code == 200
    finally:
        for proc in procs:
            proc.terminate()
        for proc, f in zip(procs, log_files, strict=True):
            proc.wait(timeout=30)
            f.close()


def test_redis_down_fail_closed_is_503(redis_server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from gateway.settings import load

    monkeypatch.setenv(ENV, SECRET)
    settings = load(_redis_gateway_config(tmp_path, redis_server.url, fail_open=False))
    with serve(settings) as s, client(s, token("closed-user")) as c:
        assert chat(c).choices  # Redis up: served
        redis_server.stop()
        with pytest.raises(openai.InternalServerError) as info:
            chat(c)
    assert info.value.status_code == 503 and info.value.response.headers["retry-after"] == "1"
    assert "redis" not in info.value.message.lower()
