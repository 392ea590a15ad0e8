"""Hot reload: a served gateway picks up config.toml edits (file watch, SIGHUP), refuses broken
files, reuses unchanged backends, and lets in-flight requests finish on the config they began with."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.app import create_app
from gateway.reload import effective_settings
from gateway.settings import load
from tests.live import LiveServer, serve
from tests.upstream_server import UpstreamServer

ROOT = Path(__file__).resolve().parents[2]


RATELIMIT = "[ratelimit]\nenabled = true\n\n[ratelimit.tiers.default]\nprincipal = { requests_per_minute = 1000 }"


def config_text(backends: dict[str, str], models: str, watch_s: float = 0.1, ratelimit: str = "[ratelimit]\nenabled = false") -> str:
    """backends: name -> upstream base_url (upstream model 'tiny')."""
    parts = [f"[server]\nconfig_watch_s = {watch_s}\n", "[auth]\nenabled = false", ratelimit, "[audit]\nenabled = false"]
    for name, url in backends.items():
        parts.append(f'[backends.{name}]\ntype = "openai"\nbase_url = "{url}"\nmodel = "tiny"')
    return "\n\n".join(parts) + "\n\n" + models


def model(name: str, *backends: str, aliases: str = "") -> str:
    deps = ", ".join(f'{{backend = "{b}"}}' for b in backends)
    return f'[[models]]\nname = "{name}"\naliases = [{aliases}]\ndeployments = [{deps}]\n'


def write(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)  # atomic, as editors and ConfigMaps do


def wait_for(predicate: Callable[[], Any], timeout_s: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.02)


def ask(client: httpx.Client, model_name: str = "m", content: str = "hi") -> httpx.Response:
    return client.post("/v1/chat/completions", json={"model": model_name, "messages": [{"role": "user", "content": content}]})


def served_by(resp: httpx.Response) -> str:
    assert resp.status_code == 200, resp.text
    return resp.json()["choices"][0]["message"]["content"].split()[0]


@contextmanager
def gateway(tmp_path: Path, make: Callable[[dict[str, str]], str]) -> Iterator[tuple[Any, Path, dict[str, UpstreamServer]]]:
    path = tmp_path / "config.toml"
    with ExitStack() as stack:
        up = {n: stack.enter_context(UpstreamServer(n)) for n in ("a", "b", "c")}
        write(path, make({n: u.url for n, u in up.items()}))
        gw = stack.enter_context(serve(load(path), config_path=str(path)))
        yield gw, path, up


def test_file_change_applies_within_seconds_and_reuses_unchanged_backends(tmp_path: Path) -> None:
    first = lambda url: config_text({"a": url["a"], "b": url["b"]}, model("m", "a"), ratelimit=RATELIMIT)  # noqa: E731
    with gateway(tmp_path, first) as (gw, path, up), httpx.Client(base_url=gw.url, timeout=10) as client:
        assert served_by(ask(client)) == "a"
        before = gw.app.state.services
        write(path, config_text({"a": up["a"].url, "c": up["c"].url}, model("m", "c") + model("n", "a"), ratelimit=RATELIMIT))
        wait_for(lambda: gw.app.state.services is not before, 10.0)
        result = gw.app.state.reloader.last_result
        assert result.ok and result.reused == ["a"] and result.started == ["c"] and result.retired == ["b"]
        assert served_by(ask(client)) == "c" and served_by(ask(client, "n")) == "a"
        after = gw.app.state.services
        assert after.backends["a"] is before.backends["a"]  # not reloaded
        assert before.limiter is not None and after.limiter is before.limiter  # counters survive
        wait_for(lambda: not before.backends["b"].info().ready)  # removed: closed (nothing in flight)
        assert "b" not in httpx.get(gw.url + "/ready").json()["backends"]


def test_broken_file_is_refused_and_old_config_keeps_serving(tmp_path: Path) -> None:
    good = lambda url: config_text({"a": url["a"]}, model("m", "a"))  # noqa: E731
    with gateway(tmp_path, good) as (gw, path, up), httpx.Client(base_url=gw.url, timeout=10) as client:
        serving = gw.app.state.services
        reloader = gw.app.state.reloader
        for broken, reason in [
            (config_text({"a": up["a"].url}, model("m", "zzz")), "unknown backend 'zzz'"),
            ("[server\nport = 1", "invalid TOML"),
            (config_text({"a": up["a"].url}, model("m", "a")).replace("[auth]", "[auth]\nbogus = 1"), "bogus"),
        ]:
            attempts = reloader.num_reloads, reloader.last_result
            write(path, broken)
            wait_for(lambda: reloader.last_result is not attempts[1], 10.0)
            assert not reloader.last_result.ok and reason in reloader.last_result.message
            assert gw.app.state.services is serving
            assert served_by(ask(client)) == "a"


def test_in_flight_request_finishes_on_its_config(tmp_path: Path) -> None:
    with gateway(tmp_path, lambda url: config_text({"a": url["a"], "b": url["b"]}, model("m", "a"))) as (gw, path, up):
        with httpx.Client(base_url=gw.url, timeout=10) as client:
            old = gw.app.state.services
            slow: dict[str, httpx.Response] = {}
            thread = threading.Thread(target=lambda: slow.setdefault("r", ask(client, "m", "opts:tokens=3&delay=0.6")))
            thread.start()
            wait_for(lambda: up["a"].app.in_flight == 1)
            write(path, config_text({"b": up["b"].url}, model("m", "b")))  # a is removed while busy
            wait_for(lambda: gw.app.state.services is not old, 10.0)
            assert served_by(ask(client)) == "b"
            assert old.backends["a"].info().ready  # still open: its request is running
            thread.join()
            assert served_by(slow["r"]) == "a"  # finished on the config it started with
            wait_for(lambda: not old.backends["a"].info().ready, 10.0)  # then closed


def test_reload_retries_a_backend_that_failed_to_load(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AIBOX_TEST_UPSTREAM_KEY", raising=False)
    path = tmp_path / "config.toml"
    with UpstreamServer("a") as up:
        text = config_text({"a": up.url}, model("m", "a")).replace('model = "tiny"', 'model = "tiny"\napi_key_env = "AIBOX_TEST_UPSTREAM_KEY"')
        write(path, text)
        server = LiveServer(create_app(load(path), config_path=str(path))).start(wait_ready=False)
        try:
            wait_for(lambda: "a" in httpx.get(server.url + "/ready").json().get("load_errors", {}))
            monkeypatch.setenv("AIBOX_TEST_UPSTREAM_KEY", "sk-now-set")
            write(path, text + "\n")  # unchanged settings; the edit only triggers the reload
            wait_for(lambda: httpx.get(server.url + "/ready").status_code == 200)
            with httpx.Client(base_url=server.url, timeout=10) as client:
                assert served_by(ask(client)) == "a"
            assert up.app.last_headers["authorization"] == "Bearer sk-now-set"
        finally:
            server.stop()


def test_restart_only_keys_keep_running_values_and_are_reported(tmp_path: Path) -> None:
    base = config_text({"a": "/x"}, model("m", "a"))
    path = tmp_path / "c.toml"
    write(path, base)
    running = load(path)
    write(path, base.replace("config_watch_s = 0.1", "config_watch_s = 0.1\nport = 9999\nrequest_timeout_s = 5"))
    effective, restart = effective_settings(load(path), running)
    assert restart == ["server.port"]
    assert effective.server.port == running.server.port and effective.server.request_timeout_s == 5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_sighup_reloads_a_served_gateway(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    fake = '[backends.f]\ntype = "fake"\n\n'
    path.write_text(config_text({}, fake + model("m", "f"), watch_s=0))
    port = _free_port()
    log = (tmp_path / "log.txt").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway.cli", "serve", "--config", str(path), "--port", str(port)],
        cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"

    def model_ids() -> list[str] | None:
        try:
            return [m["id"] for m in httpx.get(url + "/v1/models", timeout=2).json()["data"]]
        except httpx.TransportError:
            return None

    try:
        assert wait_for(model_ids, 120) == ["m"]
        path.write_text(config_text({}, fake + model("m", "f") + model("m2", "f"), watch_s=0))
        os.kill(proc.pid, signal.SIGHUP)
        wait_for(lambda: model_ids() == ["m", "m2"], 15)
        path.write_text("[[models]]\nname = 1\n")
        os.kill(proc.pid, signal.SIGHUP)
        wait_for(lambda: "refused" in (tmp_path / "log.txt").read_text(), 15)
        assert model_ids() == ["m", "m2"]
        with httpx.Client(base_url=url, timeout=10) as client:
            assert ask(client, "m2").status_code == 200
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def test_quota_changes_apply_on_reload_and_count_earlier_usage(tmp_path: Path) -> None:
    """Quotas are live keys of [audit]: raising one unblocks a caller at once, and a quota added
    by a reload counts the tokens already used today (totals are kept for everyone)."""
    db = tmp_path / "usage.db"

    def text(url: str, quotas: str) -> str:
        audit = f'[audit]\npath = "{db}"\n{quotas}'
        return config_text({"a": url}, model("m", "a")).replace("[audit]\nenabled = false", audit)

    tight = '[audit.subject_quotas."*"]\ntokens_per_day = 1'
    with gateway(tmp_path, lambda url: text(url["a"], "")) as (gw, path, up), httpx.Client(base_url=gw.url, timeout=10) as client:
        assert served_by(ask(client)) == "a"  # usage before any quota exists
        before = gw.app.state.services
        write(path, text(up["a"].url, tight))
        wait_for(lambda: gw.app.state.services is not before)
        assert gw.app.state.reloader.last_result.restart_needed == []
        refused = ask(client)  # the earlier request's tokens count against the new daily quota
        assert refused.status_code == 429 and refused.json()["error"]["code"] == "insufficient_quota"
        middle = gw.app.state.services
        write(path, text(up["a"].url, '[audit.subject_quotas."*"]\ntokens_per_day = 1000000'))
        wait_for(lambda: gw.app.state.services is not middle)
        assert served_by(ask(client)) == "a"
        last = gw.app.state.services
        write(path, text(up["a"].url, tight).replace(f'path = "{db}"', f'path = "{db}"\nretention_days = 3'))
        wait_for(lambda: gw.app.state.services is not last)
        assert gw.app.state.reloader.last_result.restart_needed == ["audit"]  # quota applied, retention not
        assert ask(client).status_code == 429


def test_unchanged_auth_keeps_its_authenticator(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    secret_env = "AIBOX_TEST_RELOAD_SECRET"
    monkeypatch.setenv(secret_env, "s" * 48)
    auth = f'[auth]\nenabled = true\nsecret_env = "{secret_env}"\ndev_generate_secret = false'
    with gateway(tmp_path, lambda url: config_text({"a": url["a"]}, model("m", "a")).replace("[auth]\nenabled = false", auth)) as (gw, path, up):
        before = gw.app.state.services
        write(path, config_text({"a": up["a"].url}, model("m", "a") + model("n", "a")).replace("[auth]\nenabled = false", auth))
        wait_for(lambda: gw.app.state.services is not before)
        assert gw.app.state.services.authenticator is before.authenticator  # not rebuilt (no key reload)
