"""`aibox usage ...` end to end: a real database, the real argument parser, every format."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import time
from pathlib import Path

import pytest

from gateway.audit import AuditRecord, AuditStore
from gateway.audit_queries import REQUEST_KEYS
from gateway.cli import main
from gateway.settings import load

NOW = time.time()  # the CLI measures --since from the wall clock, so the rows do too
HOUR = 3600.0

# (subject, tenant, status, prompt, completion, hours ago)
ROWS = [
    ("alice", "acme", 200, 10, 20, 1),
    ("alice", "acme", 200, 30, 40, 2),
    ("bob", "acme", 429, 0, 0, 3),
    ("carol", "globex", 200, 100, 200, 4),
    ("carol", "globex", 500, 5, 0, 30),  # outside the default 24h window
    ("dave", None, 401, 0, 0, 24 * 100),  # 100 days old: pruned by --older-than 90d
]


@pytest.fixture
def config(tmp_path: Path) -> Path:
    cfg = tmp_path / "config.toml"
    cfg.write_text(
        '[audit]\npath = "data/usage.db"\n'  # relative: resolved against the config's folder
        "[audit.tenant_quotas.acme]\ntokens_per_day = 1000\ntokens_per_month = 10000\n"
        '[audit.subject_quotas."*"]\ntokens_per_day = 50\n'
    )
    settings = load(cfg)

    async def fill() -> None:
        store = AuditStore(settings.audit)
        await store.start()
        for i, (subject, tenant, status, p, c, ago) in enumerate(ROWS):
            await store.record(AuditRecord(
                request_id=f"chatcmpl-{i}", ts=NOW - ago * HOUR, subject=subject, tenant=tenant, status=status,
                model_requested="gemma", model_served=None if status == 401 else "gemma",
                deployment=None if status == 401 else "fake1", prompt_tokens=p, completion_tokens=c, total_ms=100.0 * (i + 1),
                stream=i % 2 == 1, error_code="rate_limit_exceeded" if status == 429 else None,
            ))  # fmt: skip
        await store.close()

    asyncio.run(fill())
    return cfg


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(["usage", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_summary_json_default_window_is_24h(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run(capsys, "summary", "--config", str(config), "--format", "json")
    assert rc == 0
    assert json.loads(out) == [{
        "requests": 4, "errors": 1, "prompt_tokens": 140, "completion_tokens": 260, "total_tokens": 400,
        "avg_total_ms": 250.0, "avg_ttft_ms": None,
    }]  # fmt: skip


def test_summary_by_tenant_csv(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run(capsys, "summary", "--config", str(config), "--since", "7d", "--by", "tenant,status", "--format", "csv")
    assert rc == 0
    got = [(r["tenant"], r["status"], r["requests"], r["total_tokens"]) for r in csv.DictReader(io.StringIO(out))]
    assert got == [("acme", "200", "2", "100"), ("acme", "429", "1", "0"), ("globex", "200", "1", "300"), ("globex", "500", "1", "5")]


def test_summary_from_to_table(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    frm = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(NOW - 2.5 * HOUR))
    rc, out, _ = run(capsys, "summary", "--config", str(config), "--from", frm, "--by", "subject")
    assert rc == 0
    lines = [line.split() for line in out.splitlines() if line.strip()]
    header = next(line for line in lines if line[0] == "subject")
    assert header[:4] == ["subject", "requests", "errors", "prompt_tokens"]
    assert ["alice", "2", "0", "40", "60", "100"] == next(line for line in lines if line[0] == "alice")[:6]
    assert not any(line[0] in ("bob", "carol") for line in lines)


def test_requests_json_has_stable_keys_and_filters(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run(capsys, "requests", "--config", str(config), "--subject", "alice", "--format", "json", "--limit", "1")
    rows = json.loads(out)
    assert rc == 0 and [r["request_id"] for r in rows] == ["chatcmpl-0"]
    assert list(rows[0]) == list(REQUEST_KEYS)
    assert rows[0]["stream"] is False and rows[0]["completion_tokens"] == 20
    rc, out, _ = run(capsys, "requests", "--config", str(config), "--status", "error", "--format", "csv")
    assert [r["request_id"] for r in csv.DictReader(io.StringIO(out))] == ["chatcmpl-2", "chatcmpl-4", "chatcmpl-5"]


def test_requests_table_is_readable(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run(capsys, "requests", "--config", str(config), "--tenant", "acme")
    assert rc == 0
    assert "request_id" in out and "chatcmpl-2" in out and "rate_limit_exceeded" in out
    assert "chatcmpl-3" not in out  # globex


def test_top_by_subject(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run(capsys, "top", "--config", str(config), "--format", "json", "--limit", "2")
    assert rc == 0
    assert [(r["subject"], r["total_tokens"]) for r in json.loads(out)] == [("carol", 300), ("alice", 100)]


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "json"])
def test_export_streams_every_row(config: Path, capsys: pytest.CaptureFixture[str], fmt: str) -> None:
    rc, out, err = run(capsys, "export", "--config", str(config), "--format", fmt)
    assert rc == 0 and "exported 6 rows" in err
    if fmt == "csv":
        rows = list(csv.DictReader(io.StringIO(out)))
    elif fmt == "jsonl":
        rows = [json.loads(line) for line in out.splitlines()]
    else:
        rows = json.loads(out)
    assert [r["request_id"] for r in rows] == [f"chatcmpl-{i}" for i in (5, 4, 3, 2, 1, 0)]  # oldest first


def test_quota_shows_remaining(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run(capsys, "quota", "--config", str(config), "--format", "json")
    assert rc == 0
    by_key = {(r["kind"], r["key"]): r for r in json.loads(out)}
    acme = by_key[("tenant", "acme")]
    today = time.strftime("%Y-%m-%d", time.gmtime(NOW))
    used_today = sum(p + c for s, t, _, p, c, ago in ROWS if t == "acme" and time.strftime("%Y-%m-%d", time.gmtime(NOW - ago * HOUR)) == today)
    assert acme["day_limit"] == 1000 and acme["day_used"] == used_today and acme["day_remaining"] == 1000 - used_today
    assert acme["day_resets_at"].endswith("T00:00:00Z") and acme["month_limit"] == 10000
    assert by_key[("subject", "alice")]["day_limit"] == 50  # the "*" default
    rc, out, _ = run(capsys, "quota", "--config", str(config), "--tenant", "acme")
    assert rc == 0 and "acme" in out and "alice" not in out


def test_prune_then_summary(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run(capsys, "prune", "--config", str(config), "--older-than", "90d", "--format", "json")
    assert rc == 0 and json.loads(out)[0]["deleted_rows"] == 1
    rc, out, _ = run(capsys, "summary", "--db", str(config.parent / "data" / "usage.db"), "--config", "absent.toml",
                     "--from", "2000-01-01", "--format", "json")  # fmt: skip
    assert json.loads(out)[0]["requests"] == 5


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["summary", "--since", "3 days"], "invalid duration '3 days'"),
        (["summary", "--since", "1d", "--from", "2026-01-01"], "either --since or --from/--to"),
        (["summary", "--from", "yesterday"], "invalid time 'yesterday'"),
        (["summary", "--by", "colour"], "cannot group by 'colour'"),
        (["requests", "--status", "teapot"], "invalid --status 'teapot'"),
        (["summary", "--from", "2026-02-01", "--to", "2026-01-01"], "must be before its end"),
    ],
)
def test_bad_input_is_a_clear_error(config: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str) -> None:
    rc, out, err = run(capsys, *argv, "--config", str(config))
    assert rc == 2 and message in err and out == ""


def test_missing_database_and_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, err = run(capsys, "summary", "--db", str(tmp_path / "none.db"), "--config", str(tmp_path / "none.toml"))
    assert rc == 2 and "no audit database at" in err
    rc, _, err = run(capsys, "summary", "--config", str(tmp_path / "none.toml"))
    assert rc == 2 and "cannot read config file" in err


@pytest.mark.parametrize(
    ("argv", "header"),
    [
        (["requests", "--subject", "nobody"], "time,request_id,ts,subject"),
        (["summary", "--from", "2001-01-01", "--to", "2001-01-02", "--by", "tenant"], "tenant,requests,errors"),
        (["top", "--by", "model", "--from", "2001-01-01", "--to", "2001-01-02"], "model,requests,errors"),
    ],
)
def test_empty_results_keep_a_csv_header(config: Path, capsys: pytest.CaptureFixture[str], argv: list[str], header: str) -> None:
    rc, out, _ = run(capsys, *argv, "--config", str(config), "--format", "csv")
    assert rc == 0 and out.splitlines() == [out.splitlines()[0]] and out.startswith(header)
    rc, out, _ = run(capsys, *argv, "--config", str(config), "--format", "json")
    assert json.loads(out) == []
