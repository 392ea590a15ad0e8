"""`aibox usage ...`: who used what, when, how much, how fast, what failed.

    aibox usage summary  [--since 24h | --from ISO --to ISO] [--by tenant,subject,model,deployment,day,status]
    aibox usage requests [--subject S] [--tenant T] [--model M] [--status 429|4xx|error] [--since 1h] [--limit N]
    aibox usage top      [--by subject|tenant|model|deployment] [--since 24h] [--limit N]
    aibox usage export   [--format csv|jsonl|json] [--since 30d]          (streams; constant memory)
    aibox usage quota    [--tenant T] [--subject S]
    aibox usage prune    --older-than 90d [--vacuum]

Every command takes `--config PATH` (default config.toml; `[audit] path` names the database),
`--db PATH` to point at a database directly, and `--format table|json|csv`. JSON is a list of
objects whose keys are stable (`request_id`, `subject`, `requests`, `prompt_tokens`, ...).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from collections.abc import Iterable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import msgspec

from gateway import audit_queries as queries
from gateway.audit_quota import QuotaTracker, iso
from gateway.audit_schema import connect
from gateway.settings import AuditSettings, ConfigError, load

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
# Columns shown by `requests --format table`; json/csv carry every key.
_REQUEST_TABLE = ("time", "request_id", "subject", "tenant", "model", "deployment", "stream", "status",
                  "error_code", "finish_reason", "prompt_tokens", "completion_tokens", "ttft_ms", "total_ms")  # fmt: skip


_QUOTA_KEYS = ("kind", "key", "day_limit", "day_used", "day_remaining", "day_resets_at",
               "month_limit", "month_used", "month_remaining", "month_resets_at")  # fmt: skip


def parse_duration(text: str) -> float:
    """'90d', '24h', '30m', '45s', '2w' -> seconds."""
    t = text.strip().lower()
    if len(t) < 2 or t[-1] not in _UNITS or not t[:-1].replace(".", "", 1).isdigit():
        raise ValueError(f"invalid duration {text!r}: use a number and a unit, e.g. 90d, 24h, 30m, 45s")
    return float(t[:-1]) * _UNITS[t[-1]]


def parse_time(text: str) -> float:
    """ISO 8601 date or datetime (UTC when no offset is given) -> unix seconds."""
    try:
        dt = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"invalid time {text!r}: use ISO 8601, e.g. 2026-11-01 or 2026-11-01T12:00:00Z") from None
    return (dt if dt.tzinfo else dt.replace(tzinfo=timezone.utc)).timestamp()


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def _time_range(args: argparse.Namespace, default_since: str | None) -> tuple[float | None, float | None]:
    if args.since and args.from_:
        raise ValueError("use either --since or --from/--to, not both")
    until = parse_time(args.to) if args.to else None
    if args.from_:
        since = parse_time(args.from_)
    elif args.since or (default_since and not args.to):
        since = time.time() - parse_duration(args.since or default_since)
    else:
        since = None
    if since is not None and until is not None and since >= until:
        raise ValueError("the start of the range must be before its end")
    return since, until


def _audit_settings(args: argparse.Namespace) -> AuditSettings:
    if args.db and not Path(args.config).exists():
        return AuditSettings(path=args.db)  # a bare database: no config needed
    settings = load(args.config).audit
    return msgspec.structs.replace(settings, path=args.db) if args.db else settings


def _open(settings: AuditSettings) -> Any:
    if not Path(settings.path).exists():
        raise ValueError(f"no audit database at {settings.path} (set [audit] path in the config, or pass --db)")
    from gateway.audit import recover_spools

    db = connect(settings.path)
    recover_spools(db, settings.path)  # rows a crashed gateway left in its spool count too
    return db


# ---------------------------------------------------------------------------- output
def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:,.1f}"
    return str(value)


def render(
    rows: list[dict[str, Any]],
    fmt: str,
    columns: Iterable[str],
    *,
    table_columns: Iterable[str] | None = None,
    title: str | None = None,
) -> None:
    """Write rows as a table, a JSON list of objects, or CSV with a header (even when empty).

    `columns` are every key of a row (the CSV header); a table may show fewer.
    """
    keys = list(columns)
    if fmt == "json":
        json.dump(rows, sys.stdout, indent=2)
        sys.stdout.write("\n")
    elif fmt == "csv":
        writer = csv.DictWriter(sys.stdout, fieldnames=keys, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    else:
        from rich import box
        from rich.console import Console
        from rich.table import Table

        # Not a terminal: never wrap or truncate (the output is going to a file or a pager).
        console = Console(file=sys.stdout, width=None if sys.stdout.isatty() else 10_000, highlight=False)
        if not rows:
            console.print("no matching requests")
            return
        table = Table(box=box.SIMPLE_HEAD, title=title, title_justify="left")
        keys = list(table_columns or keys)
        for key in keys:
            numeric = isinstance(rows[0].get(key), (int, float)) and not isinstance(rows[0].get(key), bool)
            table.add_column(key, justify="right" if numeric else "left", no_wrap=True)
        for row in rows:
            table.add_row(*(_cell(row.get(k)) for k in keys))
        console.print(table)


def _stream(rows: Iterator[dict[str, Any]], fmt: str) -> int:
    """Write rows as they come from the cursor: CSV, JSON Lines or one JSON list."""
    num = 0
    out = sys.stdout
    if fmt == "csv":
        writer = csv.DictWriter(out, fieldnames=queries.REQUEST_KEYS, lineterminator="\n")
        writer.writeheader()
        for num, row in enumerate(rows, 1):
            writer.writerow(row)
    elif fmt == "jsonl":
        for num, row in enumerate(rows, 1):
            out.write(json.dumps(row) + "\n")
    else:
        out.write("[")
        for num, row in enumerate(rows, 1):
            out.write(("\n" if num == 1 else ",\n") + json.dumps(row))
        out.write("\n]\n")
    return num


# ---------------------------------------------------------------------------- commands
def cmd_summary(args: argparse.Namespace) -> int:
    since, until = _time_range(args, "24h")
    by = [b.strip() for b in args.by.split(",") if b.strip()] if args.by else []
    rows = queries.summary(_open(_audit_settings(args)), since, until, by)
    render(rows, args.format, [*by, *queries.METRICS], title=_range_title(since, until))
    return 0


def cmd_requests(args: argparse.Namespace) -> int:
    since, until = _time_range(args, None)
    filters = {"request_id": args.id, "subject": args.subject, "tenant": args.tenant, "model": args.model,
               "status": args.status, "since": since, "until": until}  # fmt: skip
    if args.status:
        queries.status_filter(args.status)  # validate before opening anything
    rows = queries.requests(_open(_audit_settings(args)), filters, args.limit)
    render(rows, args.format, queries.REQUEST_KEYS, table_columns=_REQUEST_TABLE)
    return 0


def cmd_top(args: argparse.Namespace) -> int:
    since, until = _time_range(args, "24h")
    rows = queries.top(_open(_audit_settings(args)), args.by, since, until, args.limit)
    render(rows, args.format, [args.by, *queries.METRICS], title=_range_title(since, until))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    since, until = _time_range(args, None)
    filters = {"subject": args.subject, "tenant": args.tenant, "model": args.model, "status": args.status,
               "since": since, "until": until}  # fmt: skip
    if args.status:
        queries.status_filter(args.status)
    num = _stream(queries.export(_open(_audit_settings(args)), filters), args.format)
    print(f"exported {num} rows", file=sys.stderr)
    return 0


def cmd_quota(args: argparse.Namespace) -> int:
    settings = _audit_settings(args)
    now = time.time()
    tracker = QuotaTracker(settings.tenant_quotas, settings.subject_quotas)
    if Path(settings.path).exists():
        tracker.seed(queries.quota_seed_rows(connect(settings.path), now, tracker.kinds))
    rows = []
    for kind, wanted in (("tenant", args.tenant), ("subject", args.subject)):
        if (args.tenant or args.subject) and not wanted:
            continue
        keys = [wanted] if wanted else tracker.keys(kind)
        for key in keys:
            st = tracker.status(kind, key, now)
            rows.append({
                "kind": kind, "key": key,
                "day_limit": st.day_limit or None, "day_used": st.day_used, "day_remaining": st.day_remaining,
                "day_resets_at": iso(st.day_resets_at),
                "month_limit": st.month_limit or None, "month_used": st.month_used,
                "month_remaining": st.month_remaining, "month_resets_at": iso(st.month_resets_at),
            })  # fmt: skip
    if not rows and args.format == "table":
        print("no quotas configured ([audit.tenant_quotas.NAME] / [audit.subject_quotas.NAME])")
        return 0
    render(rows, args.format, _QUOTA_KEYS, title="token quotas (UTC days and months; '-' = unlimited)")
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    cutoff = time.time() - parse_duration(args.older_than)
    db = _open(_audit_settings(args))
    started = time.perf_counter()
    num = queries.prune(db, cutoff)
    if args.vacuum:
        db.execute("VACUUM")
    elapsed = time.perf_counter() - started
    row = {"deleted_rows": num, "before": iso(cutoff // 86400 * 86400), "seconds": round(elapsed, 2)}
    render([row], args.format, list(row))
    return 0


def _range_title(since: float | None, until: float | None) -> str:
    return f"usage from {iso(since) if since else 'the beginning'} to {iso(until) if until else 'now'}"


def _run(func: Any) -> Any:
    def wrapped(args: argparse.Namespace) -> int:
        try:
            return func(args)
        except (ValueError, ConfigError) as exc:
            print(f"aibox usage {args.usage_command}: error: {exc}", file=sys.stderr)
            return 2
        except BrokenPipeError:  # `aibox usage export | head`
            return 0

    return wrapped


def register(subparsers: Any) -> None:
    """Add `aibox usage` and its subcommands to the `aibox` parser."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", default="config.toml", help="config file whose [audit] path names the database")
    common.add_argument("--db", help="audit database path (overrides [audit] path)")
    fmt = argparse.ArgumentParser(add_help=False)
    fmt.add_argument("--format", choices=["table", "json", "csv"], default="table")
    when = argparse.ArgumentParser(add_help=False)
    when.add_argument("--since", help="a duration back from now: 24h, 7d, 30m")
    when.add_argument("--from", dest="from_", metavar="ISO", help="start time, ISO 8601 (UTC unless an offset is given)")
    when.add_argument("--to", metavar="ISO", help="end time (exclusive), ISO 8601")
    filt = argparse.ArgumentParser(add_help=False)
    for name in ("subject", "tenant", "model"):
        filt.add_argument(f"--{name}")
    filt.add_argument("--status", help="an HTTP status (429), a class (4xx, 5xx), 'error' or 'ok'")

    usage = subparsers.add_parser("usage", help="query the usage audit store")
    sub = usage.add_subparsers(dest="usage_command", required=True, metavar="COMMAND")
    p = sub.add_parser("summary", parents=[common, fmt, when], help="requests, tokens, errors, latency (default: last 24h)")
    p.add_argument("--by", help=f"group by a comma list of: {', '.join(queries.DIMENSIONS)}")
    p.set_defaults(func=_run(cmd_summary))
    p = sub.add_parser("requests", parents=[common, fmt, when, filt], help="latest requests, newest first")
    p.add_argument("--id", help="one request id")
    p.add_argument("--limit", type=_positive_int, default=50)
    p.set_defaults(func=_run(cmd_requests))
    p = sub.add_parser("top", parents=[common, fmt, when], help="heaviest users by tokens (default: last 24h)")
    p.add_argument("--by", choices=["subject", "tenant", "model", "deployment"], default="subject")
    p.add_argument("--limit", type=_positive_int, default=10)
    p.set_defaults(func=_run(cmd_top))
    p = sub.add_parser("export", parents=[common, when, filt], help="every matching request, streamed")
    p.add_argument("--format", choices=["csv", "jsonl", "json"], default="csv")
    p.set_defaults(func=_run(cmd_export))
    p = sub.add_parser("quota", parents=[common, fmt], help="token quota used and remaining")
    p.add_argument("--tenant")
    p.add_argument("--subject")
    p.set_defaults(func=_run(cmd_quota))
    p = sub.add_parser("prune", parents=[common, fmt], help="delete requests older than a duration")
    p.add_argument("--older-than", required=True, help="e.g. 90d; rounded down to a UTC midnight")
    p.add_argument("--vacuum", action="store_true", help="then VACUUM to give the space back (slow, locks the db)")
    p.set_defaults(func=_run(cmd_prune))
