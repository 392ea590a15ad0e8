"""`aibox serve`: run the gateway under uvicorn.

uvicorn (with uvloop and httptools) rather than granian: pure-wheel install, mature graceful
shutdown (`timeout_graceful_shutdown`) and one process per gateway, which our in-process engines
need; scale-out is more gateway processes behind a balancer, sharing limits through Redis.
"""

from __future__ import annotations

import argparse
import logging
import sys

from gateway.settings import ConfigError, load


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("serve", help="serve the OpenAI API at /v1")
    p.add_argument("--config", default="config.toml", help="path to config.toml (default: %(default)s)")
    p.add_argument("--host", default=None, help="bind address (default: server.host)")
    p.add_argument("--port", type=int, default=None, help="port (default: server.port)")
    p.set_defaults(func=serve)


def serve(args: argparse.Namespace) -> int:
    import uvicorn

    from gateway.app import create_app
    from gateway.logs import configure_logging

    try:
        settings = load(args.config)
    except ConfigError as exc:
        print(f"aibox: {exc}", file=sys.stderr)
        return 1
    configure_logging(settings.server)
    log = logging.getLogger("aibox")
    try:
        _prepare_auth(settings, args.config, log)
    except ConfigError as exc:
        print(f"aibox: {exc}", file=sys.stderr)
        return 1
    app = create_app(settings, config_path=args.config)
    host = args.host or settings.server.host
    port = settings.server.port if args.port is None else args.port
    log.info("aibox serving on http://%s:%d/v1", host, port)
    from gateway.corked import CorkedHttpToolsProtocol
    from gateway.drain import DrainingServer

    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        http=CorkedHttpToolsProtocol,  # status line, headers and body in one write
        log_config=None,
        access_log=False,
        proxy_headers=False,  # nothing reads the client address or scheme: skip a middleware per request
        timeout_graceful_shutdown=int(settings.server.shutdown_timeout_s) or None,
        lifespan="on",
    )
    DrainingServer(config, app.state).run()  # SIGTERM: drain (see gateway/drain.py), then exit 0
    return 0


def _prepare_auth(settings, config_path: str, log: logging.Logger) -> None:  # type: ignore[no-untyped-def]
    """Auth off: warn loudly. Auth on with no secret in dev: make one and print a ready token."""
    from policies import auth

    if not settings.auth.enabled:
        auth.warn_if_disabled(settings.auth)
        return
    ensure = getattr(auth, "ensure_dev_secret", None)
    if ensure is None:
        return
    token = ensure(settings, config_path)
    if token:
        print(
            "\n  No JWT secret was set, so a development secret was generated.\n"
            "  Use this API key (a development token with access to every model):\n\n"
            f"    {token}\n\n"
            "  e.g.  export OPENAI_API_KEY=" + token + "\n",
            file=sys.stderr,
            flush=True,
        )
