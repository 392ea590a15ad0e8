"""An ASGI app factory for running several worker processes on one port:

    AIBOX_CONFIG=config.toml PROMETHEUS_MULTIPROC_DIR=/run/aibox-metrics \\
        uvicorn --factory gateway.asgi:create_from_env --workers 4 --host 0.0.0.0 --port 8000

Each worker loads its own backends (in-process engines are per worker: size memory for N copies)
and shares rate limits only through Redis (`ratelimit.store = "redis"`). `aibox serve` (one
process, drain on SIGTERM) remains the default; under `--workers` uvicorn's own shutdown applies
(listener closed, in-flight requests given `--timeout-graceful-shutdown`), and uvicorn's own
HTTP protocol writes each response's head and body separately (`aibox serve` runs
gateway.corked's, which joins them; uvicorn's `--http` option takes only its built-in names).
"""

from __future__ import annotations

import os

from litestar import Litestar

from gateway.app import create_app
from gateway.logs import configure_logging
from gateway.settings import load


def create_from_env() -> Litestar:
    """The app for the config named by $AIBOX_CONFIG (default config.toml)."""
    path = os.environ.get("AIBOX_CONFIG", "config.toml")
    settings = load(path)
    configure_logging(settings.server)
    return create_app(settings, config_path=path)
