"""Token minting, the dev secret, live revocation and the `aibox token` CLI."""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path

import jwt
import pytest

from gateway.cli import main as aibox
from gateway.settings import AuthSettings, AuditSettings, ConfigError, Settings
from policies.auth import AuthError, Authenticator, build_authenticator, ensure_dev_secret, warn_if_disabled
from policies.revocation import RevocationList
from policies.tokens import dev_secret_path, issue_token, parse_ttl

ENV = "AIBOX_TEST_TOKENS_SECRET"
SECRET = "s" * 48


def write_config(tmp_path: Path, extra: str = "") -> Path:
    path = tmp_path / "config.toml"
    path.write_text(f'[auth]\nsecret_env = "{ENV}"\nrevocation_path = "revoked.db"\n{extra}\n[audit]\npath = "usage.db"\n')
    return path


@pytest.mark.parametrize(("text", "seconds"), [("90", 90), ("90s", 90), ("15m", 900), ("12h", 43200), ("30d", 2592000), ("1w", 604800)])
def test_parse_ttl(text: str, seconds: int) -> None:
    assert parse_ttl(text) == seconds


@pytest.mark.parametrize("text", ["", "0", "-5m", "5x", "1.5h", "d"])
def test_parse_ttl_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="invalid TTL"):
        parse_ttl(text)


def test_issued_token_round_trips(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV, SECRET)
    settings = AuthSettings(secret_env=ENV, issuer="me", audience="you")
    token = issue_token(settings, subject="alice", tenant="acme", tier="gold", scopes=["model:a", "model:b"], ttl_s=60)
    p = Authenticator(settings).authenticate(f"Bearer {token}")
    assert (p.subject, p.tenant, p.tier, p.scopes) == ("alice", "acme", "gold", {"model:a", "model:b"})
    other = issue_token(settings, subject="alice", ttl_s=60)
    assert jwt.decode(other, options={"verify_signature": False})["jti"] != p.jti  # random jti


def test_revocation_is_seen_live_within_a_second(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV, SECRET)
    settings = AuthSettings(secret_env=ENV)
    deny = tmp_path / "revoked.db"
    auth = Authenticator(settings, revocations=RevocationList(deny))
    keep, kill = (issue_token(settings, subject=s, ttl_s=600) for s in ("keep", "kill"))
    for _ in range(3):
        auth.authenticate(f"Bearer {kill}")  # warm: the list has been polled (file absent)
    jti = jwt.decode(kill, options={"verify_signature": False})["jti"]
    assert RevocationList(deny).revoke(jti, reason="test") is True  # another "process" writes
    t0 = time.monotonic()
    while True:
        try:
            auth.authenticate(f"Bearer {kill}")
        except AuthError as exc:
            assert "revoked" in exc.message
            break
        assert time.monotonic() - t0 < 1.0, "revocation not visible within 1 s"
        time.sleep(0.02)
    assert auth.authenticate(f"Bearer {keep}").subject == "keep"
    # two revokes in a row (same mtime tick, same file size) are both seen
    jti2 = jwt.decode(keep, options={"verify_signature": False})["jti"]
    RevocationList(deny).revoke(jti2)
    time.sleep(0.3)
    with pytest.raises(AuthError, match="revoked"):
        auth.authenticate(f"Bearer {keep}")
    assert RevocationList(deny).revoke(jti2) is False


def test_revocation_list_does_not_touch_sqlite_per_check(tmp_path: Path) -> None:
    now = [0.0]
    deny = RevocationList(tmp_path / "r.db", poll_s=0.25, clock=lambda: now[0])
    deny.revoke("a")
    assert deny.is_revoked("a") and not deny.is_revoked("b")
    reloads = deny.num_reloads
    for _ in range(1000):
        deny.is_revoked("b")  # within poll_s: answered from memory
    assert deny.num_reloads == reloads


def test_ensure_dev_secret_generates_reuses_and_mints(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV, raising=False)
    config = tmp_path / "config.toml"
    settings = Settings(auth=AuthSettings(secret_env=ENV), audit=AuditSettings(path=str(tmp_path / "u.db")))
    token = ensure_dev_secret(settings, config)
    assert token is not None
    path = dev_secret_path(config)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_text().strip() == os.environ[ENV]
    principal = build_authenticator(settings).authenticate(f"Bearer {token}")
    assert principal.subject == "dev" and principal.may_use("anything")
    assert ensure_dev_secret(settings, config) is None  # the variable is now set: nothing to do
    first = path.read_text()
    monkeypatch.delenv(ENV)
    assert ensure_dev_secret(settings, config) is not None
    assert path.read_text() == first  # a restart reuses the secret: old tokens stay valid


def test_ensure_dev_secret_refuses_with_the_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV, raising=False)
    settings = Settings(auth=AuthSettings(secret_env=ENV, dev_generate_secret=False))
    with pytest.raises(ConfigError, match=f"export {ENV}="):
        ensure_dev_secret(settings, tmp_path / "config.toml")
    assert ensure_dev_secret(Settings(auth=AuthSettings(enabled=False)), tmp_path / "c.toml") is None


def test_warn_if_disabled(caplog: pytest.LogCaptureFixture) -> None:
    assert warn_if_disabled(AuthSettings(enabled=True)) is False
    assert warn_if_disabled(AuthSettings(enabled=False)) is True
    assert "auth.enabled = false" in caplog.text


def test_cli_create_inspect_revoke(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path)
    monkeypatch.delenv(ENV, raising=False)
    # no secret set: the CLI signs with the same dev secret `aibox serve` would use
    rc = aibox(["token", "create", "--sub", "alice", "--tenant", "acme", "--scopes", "model:a,model:b", "--ttl", "1h", "--config", str(config)])
    out = capsys.readouterr()
    assert rc == 0
    token = out.out.strip().splitlines()[-1]
    assert dev_secret_path(config).exists() and "jti=" in out.err
    serve_settings = Settings(auth=AuthSettings(secret_env=ENV, revocation_path=str(tmp_path / "revoked.db")))
    assert ensure_dev_secret(serve_settings, config) is not None  # what `aibox serve` does at startup
    auth = build_authenticator(serve_settings)
    assert auth.authenticate(f"Bearer {token}").scopes == {"model:a", "model:b"}

    assert aibox(["token", "inspect", token, "--config", str(config)]) == 0
    assert '"verdict": "accepted"' in capsys.readouterr().out

    assert aibox(["token", "revoke", token, "--config", str(config)]) == 0  # the whole token works too
    assert "revoked:" in capsys.readouterr().out
    time.sleep(0.3)
    with pytest.raises(AuthError, match="revoked"):
        auth.authenticate(f"Bearer {token}")
    assert aibox(["token", "inspect", token, "--config", str(config)]) == 1
    assert "rejected: Token has been revoked." in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["token", "create", "--sub", "a", "--ttl", "soon"], "invalid TTL"),
        (["token", "inspect", "garbage"], "not a JWT"),
        (["token", "revoke", "a.b.c"], "not a JWT"),
    ],
)
def test_cli_errors_are_clear(tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str) -> None:
    config = write_config(tmp_path)
    assert aibox([*argv, "--config", str(config)]) == 1
    assert message in capsys.readouterr().err


def test_cli_refuses_without_secret_when_dev_generation_is_off(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv(ENV, raising=False)
    config = write_config(tmp_path, "dev_generate_secret = false")
    assert aibox(["token", "create", "--sub", "a", "--config", str(config)]) == 1
    assert ENV in capsys.readouterr().err


def test_cli_create_notes_likely_mistakes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv(ENV, SECRET)
    config = write_config(tmp_path, '[ratelimit.tiers.default]\nprincipal = { requests_per_minute = 5 }')
    assert aibox(["token", "create", "--sub", "a", "--tier", "platinum", "--config", str(config)]) == 0
    out = capsys.readouterr()
    assert "tier 'platinum' is not in [ratelimit.tiers]" in out.err
    assert len(out.out.strip().splitlines()) == 1  # stdout holds only the token


def test_cli_signs_rs256_with_the_private_key_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    (tmp_path / "priv.pem").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    (tmp_path / "pub.pem").write_bytes(
        key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    config = tmp_path / "config.toml"
    config.write_text('[auth]\nalgorithms = ["RS256"]\npublic_key_file = "pub.pem"\nprivate_key_file = "priv.pem"\n')
    assert aibox(["token", "create", "--sub", "svc", "--config", str(config)]) == 0
    token = capsys.readouterr().out.strip().splitlines()[-1]
    assert jwt.get_unverified_header(token)["alg"] == "RS256"
    assert aibox(["token", "inspect", token, "--config", str(config)]) == 0
    config.write_text('[auth]\nalgorithms = ["RS256"]\npublic_key_file = "pub.pem"\n')
    assert aibox(["token", "create", "--sub", "svc", "--config", str(config)]) == 1
    assert "private_key_file" in capsys.readouterr().err
