"""Routing and failover end to end: an aibox gateway (uvicorn, 127.0.0.1) in front of tiny real
OpenAI-compatible upstreams (tests/upstream_server.py), some of them separate killable processes."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest

from policies.routing import Router
from tests.live import serve, settings_from
from tests.upstream_server import UpstreamServer

ROOT = Path(__file__).resolve().parents[2]


def gateway_doc(backends: dict[str, tuple[str, str]], models: list[dict], routes: list[dict] | None = None, **backend_kw: Any) -> dict:
    """backends: name -> (upstream url, upstream model string)."""
    return {
        "auth": {"enabled": False},
        "ratelimit": {"enabled": False},
        "audit": {"enabled": False},
        "backends": {n: {"type": "openai", "base_url": url, "model": m, **backend_kw} for n, (url, m) in backends.items()},
        "models": models,
        "routes": routes or [],
    }


def ask(client: httpx.Client, model: str = "m", content: str = "hi", **kw: Any) -> httpx.Response:
    return client.post("/v1/chat/completions", json={"model": model, "messages": [{"role": "user", "content": content}], **kw})


def served_by(resp: httpx.Response) -> str:
    assert resp.status_code == 200, resp.text
    return resp.json()["choices"][0]["message"]["content"].split()[0]


@contextmanager
def upstreams(*names: str) -> Iterator[dict[str, UpstreamServer]]:
    with ExitStack() as stack:
        yield {n: stack.enter_context(UpstreamServer(n)) for n in names}


@contextmanager
def upstream_process(name: str) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """An upstream in its own process, so the test can kill -9 it."""
    proc = subprocess.Popen([sys.executable, "-m", "tests.upstream_server", "--name", name], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("PORT "), line
        url = f"http://127.0.0.1:{int(line.split()[1])}/v1"
        deadline = time.monotonic() + 10
        while True:  # the port is bound before uvicorn accepts; wait until it answers
            try:
                httpx.get(url + "/models", timeout=1)
                break
            except httpx.TransportError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        yield proc, url
    finally:
        proc.kill()
        proc.wait(timeout=10)
        if proc.stdout is not None:
            proc.stdout.close()


def test_weighted_shares_over_http() -> None:
    with upstreams("a", "b") as up:
        doc = gateway_doc({"a": (up["a"].url, "tiny"), "b": (up["b"].url, "tiny")}, [{"name": "m", "deployments": [{"backend": "a", "weight": 3}, {"backend": "b", "weight": 1}]}])
        with serve(settings_from(doc)) as gw, httpx.Client(base_url=gw.url, timeout=10) as client:
            counts = Counter(served_by(ask(client)) for _ in range(80))
    assert counts["a"] + counts["b"] == 80
    assert 45 <= counts["a"] <= 75  # expected 60; binomial sd ~3.9


def test_least_busy_prefers_the_idle_deployment() -> None:
    with upstreams("a", "b") as up:
        doc = gateway_doc({"a": (up["a"].url, "tiny"), "b": (up["b"].url, "tiny")}, [{"name": "m", "strategy": "least_busy", "deployments": [{"backend": "a"}, {"backend": "b"}]}])
        with serve(settings_from(doc)) as gw, httpx.Client(base_url=gw.url, timeout=30) as client:
            with ThreadPoolExecutor(1) as pool:
                # A long request (tokens 1.5 s apart) occupies one deployment...
                slow = pool.submit(ask, client, "m", "opts:tokens=2&delay=1.5")
                deadline = time.monotonic() + 5
                while sum(u.app.in_flight for u in up.values()) == 0 and time.monotonic() < deadline:
                    time.sleep(0.01)
                busy = next(n for n, u in up.items() if u.app.in_flight)
                quick = [served_by(ask(client)) for _ in range(8)]
                assert served_by(slow.result()) == busy
    assert quick == [("b" if busy == "a" else "a")] * 8  # ...so every quick one goes to the idle one


@pytest.mark.slow
def test_killed_upstream_causes_no_client_error_for_new_requests() -> None:
    with upstream_process("a") as (proc_a, url_a), upstream_process("b") as (_, url_b):
        model = {"name": "m", "retries": 1, "allowed_fails": 1, "cooldown_s": 60, "deployments": [{"backend": "a"}, {"backend": "b"}]}
        with serve(settings_from(gateway_doc({"a": (url_a, "tiny?delay=0.005"), "b": (url_b, "tiny?delay=0.005")}, [model]))) as gw:
            results: list[tuple[float, int, str]] = []
            lock = threading.Lock()
            stop_at = time.monotonic() + 2.5

            def client_loop() -> None:
                with httpx.Client(base_url=gw.url, timeout=10) as client:
                    while time.monotonic() < stop_at:
                        started = time.monotonic()
                        r = ask(client)
                        who = r.json()["choices"][0]["message"]["content"].split()[0] if r.status_code == 200 else "-"
                        with lock:
                            results.append((started, r.status_code, who))

            threads = [threading.Thread(target=client_loop) for _ in range(4)]
            for t in threads:
                t.start()
            time.sleep(0.8)
            proc_a.kill()
            killed_at = time.monotonic()
            proc_a.wait()
            for t in threads:
                t.join()
            ready = httpx.get(gw.url + "/ready").json()
            metrics = httpx.get(gw.url + "/metrics").text
    before = [r for r in results if r[0] < killed_at]
    after = [r for r in results if r[0] > killed_at]
    assert {"a", "b"} <= {who for _, _, who in before}
    # Only a request already streaming from `a` when it died may fail (no failover once output began).
    assert sum(status != 200 for _, status, _ in before) <= len(threads)
    assert len(after) >= 10
    assert all(status == 200 for _, status, _ in after), Counter(s for _, s, _ in after)
    assert {who for _, _, who in after} == {"b"}
    assert ready["routing"]["a"]["cooling"] is True
    assert 'aibox_deployment_cooling{backend="a"} 1.0' in metrics


def test_cross_model_fallback_and_no_failover_on_request_errors() -> None:
    with upstreams("a", "b") as up:
        backends = {"broken": (up["a"].url, "tiny?status=503"), "bad_request": (up["a"].url, "tiny?status=400"), "ok": (up["b"].url, "tiny")}
        models = [
            {"name": "big", "deployments": [{"backend": "broken"}], "fallbacks": ["small"]},
            {"name": "small", "deployments": [{"backend": "ok"}]},
            {"name": "strict", "strategy": "priority", "deployments": [{"backend": "bad_request"}, {"backend": "ok", "priority": 1}]},
        ]
        with serve(settings_from(gateway_doc(backends, models))) as gw, httpx.Client(base_url=gw.url, timeout=10) as client:
            resp = ask(client, "big")
            assert served_by(resp) == "b"
            stream = ask(client, "big", stream=True)
            events = [line[6:] for line in stream.text.splitlines() if line.startswith("data: ")]
            assert events[-1] == "[DONE]" and not any('"error"' in e for e in events)
            assert "".join(msgspec.json.decode(e)["choices"][0]["delta"].get("content", "") for e in events[:-1] if msgspec.json.decode(e)["choices"]).startswith("b ")
            assert up["a"].app.by_model["tiny?status=503"] == 2
            num_ok_before = up["b"].app.num_requests
            bad = ask(client, "strict")
            assert bad.status_code == 400 and "upstream says 400" in bad.json()["error"]["message"]
            assert up["b"].app.num_requests == num_ok_before  # a request-caused 4xx is not retried elsewhere


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_cooldown_and_recovery_over_http() -> None:
    with upstreams("p", "s") as up:
        model = {"name": "m", "strategy": "priority", "allowed_fails": 2, "cooldown_s": 30, "deployments": [{"backend": "p"}, {"backend": "s", "priority": 1}]}
        with serve(settings_from(gateway_doc({"p": (up["p"].url, "tiny"), "s": (up["s"].url, "tiny")}, [model]))) as gw:
            services = gw.app.state.services
            clock = Clock()  # a real Router on an injected clock, so cooldown expiry needs no sleep
            services.router = Router(services.settings, services.backends, clock=clock)
            with httpx.Client(base_url=gw.url, timeout=10) as client:
                up["p"].app.force_status = 502
                assert [served_by(ask(client)) for _ in range(2)] == ["s", "s"]  # failover, p fails twice
                assert up["p"].app.num_requests == 2 and services.router.is_cooling("p")
                assert [served_by(ask(client)) for _ in range(3)] == ["s", "s", "s"]
                assert up["p"].app.num_requests == 2  # cooling: p is behind s and s answers
                up["p"].app.force_status = None
                clock.now += 29
                assert served_by(ask(client)) == "s"
                clock.now += 2
                assert served_by(ask(client)) == "p"  # recovered
                assert httpx.get(gw.url + "/ready").json()["routing"]["p"]["cooling"] is False


def test_first_token_timeout_fails_over() -> None:
    with upstreams("slow", "fast") as up:
        backends = {"slow": (up["slow"].url, "tiny?first_delay=5"), "fast": (up["fast"].url, "tiny")}
        model = {"name": "m", "strategy": "priority", "deployments": [{"backend": "slow"}, {"backend": "fast", "priority": 1}]}
        doc = gateway_doc(backends, [model], first_token_timeout_s=0.3)
        with serve(settings_from(doc)) as gw, httpx.Client(base_url=gw.url, timeout=10) as client:
            t0 = time.monotonic()
            assert served_by(ask(client)) == "fast"
            assert time.monotonic() - t0 < 2.5


def test_tenant_pinning_over_http(monkeypatch: pytest.MonkeyPatch) -> None:
    from policies.tokens import issue_token

    secret = "s" * 48
    monkeypatch.setenv("AIBOX_TEST_ROUTING_SECRET", secret)
    with upstreams("cpu", "gpu") as up:
        doc = gateway_doc(
            {"cpu": (up["cpu"].url, "tiny"), "gpu": (up["gpu"].url, "tiny")},
            [{"name": "m", "deployments": [{"backend": "cpu"}, {"backend": "gpu"}]}, {"name": "other", "deployments": [{"backend": "cpu"}]}],
            routes=[{"match": {"tenant": "acme"}, "deployments": ["gpu"]}, {"match": {"tenant": "globex"}, "models": ["other"]}],
        )
        doc["auth"] = {"enabled": True, "secret_env": "AIBOX_TEST_ROUTING_SECRET"}
        settings = settings_from(doc)

        def client_for(tenant: str) -> httpx.Client:
            token = issue_token(settings.auth, subject="u", tenant=tenant, ttl_s=600, secret=secret)
            return httpx.Client(base_url=gw.url, timeout=10, headers={"authorization": f"Bearer {token}"})

        with serve(settings) as gw:
            with client_for("acme") as acme, client_for("globex") as globex, client_for("initech") as initech:
                assert {served_by(ask(acme)) for _ in range(10)} == {"gpu"}
                assert {served_by(ask(initech)) for _ in range(20)} == {"cpu", "gpu"}
                denied = ask(globex, "m")
                assert denied.status_code == 403 and denied.json()["error"]["type"] == "permission_error"
                assert [m["id"] for m in globex.get("/v1/models").json()["data"]] == ["other"]


def test_aibox_gateway_in_front_of_an_aibox_worker() -> None:
    worker_doc = {
        "auth": {"enabled": False},
        "ratelimit": {"enabled": False},
        "audit": {"enabled": False},
        "backends": {"f": {"type": "fake"}},
        "models": [{"name": "gemma", "deployments": [{"backend": "f"}]}],
    }
    body = {"messages": [{"role": "user", "content": "hello there"}], "max_tokens": 5, "temperature": 0}
    with serve(settings_from(worker_doc)) as worker:
        doc = gateway_doc({"w": (worker.url + "/v1", "gemma")}, [{"name": "m", "deployments": [{"backend": "w"}]}])
        with serve(settings_from(doc)) as gw, httpx.Client(timeout=10) as client:
            direct = client.post(worker.url + "/v1/chat/completions", json={**body, "model": "gemma"}).json()
            via = client.post(gw.url + "/v1/chat/completions", json={**body, "model": "m"}).json()
            assert via["choices"][0]["message"]["content"] == direct["choices"][0]["message"]["content"]
            assert via["choices"][0]["finish_reason"] == direct["choices"][0]["finish_reason"] == "length"
            assert via["usage"] == direct["usage"]  # the worker's real usage, not an estimate
            stream = client.post(gw.url + "/v1/chat/completions", json={**body, "model": "m", "stream": True})
            events = [msgspec.json.decode(line[6:]) for line in stream.text.splitlines() if line.startswith("data: {")]
            text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"])
            assert text == direct["choices"][0]["message"]["content"]
