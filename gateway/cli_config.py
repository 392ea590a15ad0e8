"""`aibox config check PATH`: validate a config file without serving it."""

from __future__ import annotations

import argparse
import sys

from gateway.settings import ConfigError, load


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("config", help="configuration tools")
    csub = p.add_subparsers(dest="config_command", required=True, metavar="SUBCOMMAND")
    check = csub.add_parser("check", help="validate a config file; exit 1 with the reason if it is invalid")
    check.add_argument("path", nargs="?", default="config.toml")
    check.set_defaults(func=check_config)


def check_config(args: argparse.Namespace) -> int:
    try:
        settings = load(args.path)
    except ConfigError as exc:
        print(f"invalid: {exc}", file=sys.stderr)
        return 1
    names = ", ".join(f"{m.name} ({len(m.deployments)} deployment(s))" for m in settings.models) or "none"
    print(f"ok: {args.path}: {len(settings.backends)} backend(s), models: {names}")
    return 0
