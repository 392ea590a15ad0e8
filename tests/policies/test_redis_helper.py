"""The redis-server test helper: a missing binary skips locally but fails under CI=true."""

from __future__ import annotations

import pytest

from tests.redis_server import RedisServer, require_redis_binary


@pytest.mark.parametrize(("ci", "outcome"), [("true", pytest.fail.Exception), ("", pytest.skip.Exception)])
def test_missing_binary(monkeypatch: pytest.MonkeyPatch, ci: str, outcome: type[BaseException]) -> None:
    monkeypatch.setenv("AIBOX_TEST_REDIS_SERVER", "/nonexistent/redis-server")
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.setenv("CI", ci)
    with pytest.raises(outcome, match="redis-server not found"):
        require_redis_binary()


def test_stop_and_restart_keep_the_port(redis_server: RedisServer) -> None:
    port = redis_server.port
    assert redis_server.running
    redis_server.stop()
    assert not redis_server.running and not redis_server._ping()
    redis_server.start()
    assert redis_server.running and redis_server.port == port and redis_server._ping()
