"""Shared fixtures. Keep this small: fixtures live beside the helpers they wrap."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.redis_server import RedisServer


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A fresh redis-server on a free port (skips without the binary; fails under CI=true)."""
    with RedisServer() as server:
        yield server
