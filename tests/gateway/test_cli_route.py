"""`aibox route explain` against a real config file, through the real CLI entry point."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.cli import main

CONFIG = """
[auth]
enabled = false
secret_env = "AIBOX_TEST_ROUTE_SECRET"

[backends.gpu]
type = "openai"
base_url = "http://127.0.0.1:9/v1"
model = "big"

[backends.cpu1]
type = "fake"

[backends.cpu2]
type = "fake"

[[models]]
name = "chat"
aliases = ["gpt-4o-mini"]
deployments = [{backend = "gpu", weight = 3}, {backend = "cpu1"}, {backend = "cpu2"}]
retries = 1
fallbacks = ["small"]

[[models]]
name = "small"
deployments = [{backend = "cpu1"}]

[[routes]]
match = {tenant = "acme"}
deployments = ["gpu"]

[[routes]]
match = {tenant = "globex"}
models = ["small"]
"""


@pytest.fixture
def config(tmp_path: Path) -> str:
    path = tmp_path / "config.toml"
    path.write_text(CONFIG)
    return str(path)


def rows(out: str) -> list[list[str]]:
    return [line.split()[1:3] for line in out.splitlines() if line.strip()[:1].isdigit()]


def test_explain_default_principal(config: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["route", "explain", "--config", config, "--model", "gpt-4o-mini"]) == 0
    out = capsys.readouterr().out
    assert "alias of 'chat'" in out and "60% of first picks" in out
    assert rows(out) == [["gpu", "chat"], ["cpu1", "chat"], ["cpu1", "small"]]
    assert "cpu2 (beyond 1 + retries=1 attempts)" in out


@pytest.mark.parametrize(
    ("who", "rc", "expected_rows", "text"),
    [
        (["--tenant", "acme"], 0, [["gpu", "chat"]], "excluded by the tenant rule"),
        (["--tenant", "globex"], 2, [], "DENIED (403)"),
        (["--scopes", "model:small"], 2, [], "scopes do not include"),
    ],
)
def test_explain_per_principal(config: str, capsys: pytest.CaptureFixture[str], who: list[str], rc: int, expected_rows: list, text: str) -> None:
    assert main(["route", "explain", "--config", config, "--model", "chat", *who]) == rc
    out = capsys.readouterr().out
    assert rows(out) == expected_rows and text in out


def test_explain_unknown_model(config: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["route", "explain", "--config", config, "--model", "nope"]) == 2
    assert "known models: chat, gpt-4o-mini, small" in capsys.readouterr().err


def test_explain_as_the_principal_of_a_token(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    from gateway.settings import load
    from policies.tokens import issue_token

    path = tmp_path / "config.toml"
    path.write_text(CONFIG.replace("enabled = false", "enabled = true"))
    monkeypatch.setenv("AIBOX_TEST_ROUTE_SECRET", "k" * 40)
    token = issue_token(load(path).auth, subject="alice", tenant="acme", ttl_s=600)
    assert main(["route", "explain", "--config", str(path), "--model", "chat", "--token", token]) == 0
    out = capsys.readouterr().out
    assert "subject=alice tenant=acme" in out and rows(out) == [["gpu", "chat"]]
    assert main(["route", "explain", "--config", str(path), "--model", "chat", "--token", token + "x"]) == 1
    assert "token rejected" in capsys.readouterr().err
