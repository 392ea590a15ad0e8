"""The `aibox` command. Each command group lives in its own module exposing
`register(subparsers)`; this file only assembles them."""

from __future__ import annotations

import argparse
import importlib
import sys

# Modules that add subcommands; each defines register(subparsers) and sets a `func` default.
_COMMAND_MODULES = ["gateway.cli_serve", "gateway.cli_config", "gateway.cli_token", "gateway.cli_usage", "gateway.cli_route"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="aibox", description="Self-hosted OpenAI-compatible inference gateway.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in _COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:
                continue  # command group not built yet
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
