"""/metrics over real HTTP: request series, vLLM-style names, live gauges, multiprocess mode, and
the one-line-per-request access log."""

from __future__ import annotations

import logging
import os
import re
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.live import LiveServer, serve, settings_from
from tests.ops.helpers import chat, config, sse_events


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """{(sample name, sorted labels): value} of a Prometheus text exposition."""
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(text: str, name: str, **labels: str) -> float:
    return samples(text).get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    audit = {"enabled": True, "path": str(tmp_path_factory.mktemp("metrics") / "usage.db")}
    limits = {"store": "memory", "tiers": {"default": {"models": {"limited": {"requests_per_minute": 1}}}}}
    doc = config(audit=audit, ratelimit=limits)
    doc["models"].append({"name": "limited", "deployments": [{"backend": "f"}]})
    with serve(settings_from(doc)) as live:
        yield live


def test_request_series_follow_the_traffic(server: LiveServer) -> None:
    with httpx.Client(base_url=server.url) as client:
        r = client.post("/v1/chat/completions", json=chat(max_tokens=4))
        assert r.status_code == 200
        usage = r.json()["usage"]
        s = client.post("/v1/chat/completions", json=chat(max_tokens=3, stream=True))
        assert sse_events(s.text)[-1] == "[DONE]"
        assert client.post("/v1/chat/completions", json=chat(model="nope")).status_code == 404
        assert client.post("/v1/completions", json={"model": "m", "prompt": "x", "n": 99}).status_code == 400
        assert client.post("/v1/chat/completions", json=chat(model="limited", max_tokens=1)).status_code == 200
        assert client.post("/v1/chat/completions", json=chat(model="limited", max_tokens=1)).status_code == 429
        text = client.get("/metrics").text
    assert value(text, "aibox_requests_total", endpoint="chat.completions", model="m", status="200") == 2
    assert value(text, "aibox_requests_total", endpoint="chat.completions", model="unknown", status="404") == 1
    assert value(text, "aibox_requests_total", endpoint="completions", model="m", status="400") == 1
    assert value(text, "aibox_rate_limited_total", model="limited", reason="rate_limit_exceeded") == 1
    served = {"model_name": "m", "backend": "f"}
    assert value(text, "aibox:generation_tokens_total", **served) == usage["completion_tokens"] + 3
    assert value(text, "aibox:prompt_tokens_total", **served) == 2 * usage["prompt_tokens"]
    assert value(text, "aibox:time_to_first_token_seconds_count", **served) == 2
    assert value(text, "aibox:e2e_request_latency_seconds_count", **served) == 2
    assert value(text, "aibox:time_per_output_token_seconds_count", **served) == 2
    assert value(text, "aibox:request_success_total", model_name="m", finished_reason="length") == 2
    assert value(text, "aibox_request_duration_seconds_count", endpoint="chat.completions", stream="true") == 1


def test_live_gauges_read_backends_router_and_audit(server: LiveServer) -> None:
    with httpx.Client(base_url=server.url) as client:
        assert client.post("/v1/chat/completions", json=chat(max_tokens=2)).status_code == 200
        text = client.get("/metrics").text
    assert value(text, "aibox_backend_ready", backend="f") == 1
    assert value(text, "aibox_backend_in_flight", backend="f") == 0
    assert value(text, "aibox_requests_in_flight") == 0
    assert value(text, "aibox_deployment_attempts_total", backend="f") >= 1
    assert ("aibox_deployment_cooling", (("backend", "f"),)) in samples(text)
    # Rows are durable in the spool before the response ends and committed by the writer
    # within ~50 ms after: give it a moment to read 0.
    deadline = time.monotonic() + 2
    while value(text, "aibox_audit_queue_depth") != 0 and time.monotonic() < deadline:
        time.sleep(0.02)
        text = httpx.get(server.url + "/metrics").text
    assert value(text, "aibox_audit_queue_depth") == 0
    assert value(text, "aibox_audit_rows_written_total") >= 1
    assert ("aibox_audit_writer_lag_seconds", ()) in samples(text)


def test_access_log_line_has_ids_and_no_prompt(server: LiveServer, caplog: pytest.LogCaptureFixture) -> None:
    secret_prompt = "my-private-prompt-words"
    with caplog.at_level(logging.INFO, logger="aibox.access"):
        r = httpx.post(server.url + "/v1/chat/completions", json=chat(secret_prompt, max_tokens=2), headers={"x-request-id": "trace-42"})
        generated = httpx.post(server.url + "/v1/chat/completions", json=chat(max_tokens=1))
    assert r.headers["x-request-id"] == "trace-42"
    assert generated.headers["x-request-id"] == generated.json()["id"]
    records = [rec for rec in caplog.records if rec.name == "aibox.access"]
    mine = next(rec for rec in records if rec.__dict__.get("request_id") == "trace-42")
    assert mine.__dict__["status"] == 200 and mine.__dict__["deployment"] == "f" and mine.__dict__["model"] == "m"
    assert mine.__dict__["subject"] and mine.__dict__["total_ms"] >= mine.__dict__["ttft_ms"] >= 0
    assert all(secret_prompt not in rec.getMessage() and secret_prompt not in str(rec.__dict__) for rec in records)


_WORKER = textwrap.dedent(
    """
    import sys
    from gateway.metrics import Metrics
    from gateway.context import Call
    from tests.live import settings_from
    from tests.ops.helpers import config

    metrics = Metrics(settings_from(config()))
    for _ in range(int(sys.argv[1])):
        call = Call(request_id="r", endpoint="completions", ts=0.0, t0=0.0, model_served="m", deployment="f",
                    completion_tokens=5, total_ms=12.0, ttft_ms=2.0, finish_reason="stop")
        metrics.observe(call)
    if sys.argv[2] == "render":
        sys.stdout.write(metrics.render().decode())
    """
)


@pytest.mark.slow
def test_multiprocess_mode_sums_workers(tmp_path: Path) -> None:
    """Two worker processes write to PROMETHEUS_MULTIPROC_DIR; a third one's /metrics sums them."""
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    root = Path(__file__).resolve().parents[2]

    def worker(n: int, mode: str) -> str:
        done = subprocess.run([sys.executable, "-c", _WORKER, str(n), mode], env=env, cwd=root, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        return done.stdout

    worker(3, "quiet")
    worker(4, "quiet")
    text = worker(0, "render")
    assert value(text, "aibox_requests_total", endpoint="completions", model="m", status="200") == 7
    assert value(text, "aibox:generation_tokens_total", model_name="m", backend="f") == 35


def test_grafana_dashboard_queries_only_exported_series(server: LiveServer) -> None:
    """Every metric the shipped dashboard queries is one the gateway exports (a rename breaks this)."""
    from gateway.metrics import LIVE_SERIES

    text = httpx.get(server.url + "/metrics").text
    exported = {fam.name for fam in text_string_to_metric_families(text)}
    exported |= {name for name, (_, kind, _, _) in LIVE_SERIES.items()}  # engine gauges a fake backend lacks
    dashboard = (Path(__file__).resolve().parents[2] / "deploy" / "grafana-dashboard.json").read_text()
    queried = set(re.findall(r"\b(aibox[:_][a-z0-9_:]+?)(?:_bucket|_total|_count|_sum)?\b(?=[{\[)\s,])", dashboard))
    assert queried, "no queries found"
    assert queried <= exported, sorted(queried - exported)


@pytest.mark.slow
def test_two_uvicorn_workers_share_one_metrics_view(tmp_path: Path) -> None:
    """uvicorn --workers 2 with PROMETHEUS_MULTIPROC_DIR: whichever worker answers /metrics
    counts the requests both workers served."""
    config = tmp_path / "config.toml"
    config.write_text(
        "[auth]\nenabled = false\n[ratelimit]\nenabled = false\n[audit]\nenabled = false\n"
        '[backends.f]\ntype = "fake"\n[[models]]\nname = "m"\ndeployments = [{backend = "f"}]\n'
    )
    metrics_dir = tmp_path / "prom"
    metrics_dir.mkdir()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "AIBOX_CONFIG": str(config), "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)}
    cmd = [sys.executable, "-m", "uvicorn", "--factory", "gateway.asgi:create_from_env", "--workers", "2", "--port", str(port), "--log-level", "warning"]
    proc = subprocess.Popen(cmd, cwd=Path(__file__).resolve().parents[2], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        pids: set[int] = set()
        while len(pids) < 2:  # both workers up and serving (new connections spread over them)
            assert time.monotonic() < deadline and proc.poll() is None, "workers did not start"
            try:
                with httpx.Client(base_url=url) as client:
                    r = client.post("/v1/chat/completions", json=chat(max_tokens=1))
                    assert r.status_code == 200
            except httpx.TransportError:
                time.sleep(0.1)
                continue
            pids = {int(p.stem.split("_")[-1]) for p in metrics_dir.glob("counter_*.db")}
        num_sent = 0
        for _ in range(20):
            with httpx.Client(base_url=url) as client:  # a new connection each time
                num_sent += client.post("/v1/chat/completions", json=chat(max_tokens=1)).status_code == 200
        seen_by = {value(httpx.get(url + "/metrics").text, "aibox_requests_total", endpoint="chat.completions", model="m", status="200") for _ in range(6)}
        total = next(iter(seen_by))
        assert len(seen_by) == 1 and total >= num_sent + 2, seen_by  # the same sum whichever worker answers
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_requests_in_flight_counts_streams_until_their_last_byte() -> None:
    doc = config(fake={"tokens_per_s": 20.0})  # a 10-token stream lasts ~0.5 s
    with serve(settings_from(doc)) as live, httpx.Client(base_url=live.url, timeout=10) as client:
        with client.stream("POST", "/v1/chat/completions", json=chat(max_tokens=10, stream=True)) as r:
            lines = r.iter_lines()
            assert next(line for line in lines if line.startswith("data: "))  # streaming now
            assert value(client.get("/metrics").text, "aibox_requests_in_flight") == 1
            assert "data: [DONE]" in list(lines)
        assert value(client.get("/metrics").text, "aibox_requests_in_flight") == 0
