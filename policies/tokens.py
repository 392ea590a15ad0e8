"""Minting tokens (`aibox token create`) and the development secret that makes `make run` work.

Signing uses the first algorithm in `auth.algorithms`: HS* with the secret from `auth.secret_env`
(or, in development, the generated `.aibox/dev-secret` beside the config file), others with
`auth.private_key_file`. Every token gets a random `jti` so it can be revoked.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import jwt

from gateway.settings import AuthSettings, ConfigError, Settings
from policies.auth import HMAC_ALGORITHMS, check_secret_strength, hmac_secret_from_env

log = logging.getLogger("aibox.auth")

DEV_TOKEN_TTL_S = 30 * 86400
_TTL_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400, "y": 365 * 86400}


def parse_ttl(text: str) -> int:
    """'30d', '12h', '15m', '90s' or a bare number of seconds -> seconds (> 0)."""
    m = re.fullmatch(r"\s*(\d+)\s*([smhdwy]?)\s*", text.lower())
    if not m or int(m.group(1)) <= 0:
        raise ValueError(f"invalid TTL {text!r}: use a positive number with a unit s, m, h, d, w or y (e.g. 30d)")
    return int(m.group(1)) * _TTL_UNITS[m.group(2) or "s"]


def dev_secret_path(config_path: str | Path) -> Path:
    """`.aibox/dev-secret` in the folder of the config file."""
    return Path(config_path).resolve().parent / ".aibox" / "dev-secret"


def read_dev_secret(config_path: str | Path) -> str | None:
    """The generated development secret, if one exists."""
    try:
        return dev_secret_path(config_path).read_text(encoding="utf-8").strip() or None
    except FileNotFoundError:
        return None


def load_or_create_dev_secret(config_path: str | Path) -> str:
    """Reuse `.aibox/dev-secret` or create it (mode 0600) so tokens survive restarts."""
    existing = read_dev_secret(config_path)
    if existing:
        return existing
    path = dev_secret_path(config_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    secret = secrets.token_urlsafe(48)  # 64 chars: long enough for HS512 too
    # O_EXCL: if two processes race, one wins and the other reads the winner's secret.
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return read_dev_secret(config_path) or secret
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(secret + "\n")
    return secret


def signing_secret(settings: AuthSettings, config_path: str | Path) -> str | None:
    """HS* secret for signing: the env var, else the dev secret file (what `make run` uses)."""
    return hmac_secret_from_env(settings) or read_dev_secret(config_path)


def issue_token(
    settings: AuthSettings,
    *,
    subject: str,
    tenant: str | None = None,
    tier: str | None = None,
    scopes: Iterable[str] = (),
    ttl_s: int,
    secret: str | None = None,
    now: float | None = None,
) -> str:
    """Sign a JWT the gateway configured by `settings` accepts."""
    if not subject:
        raise ValueError("subject must be non-empty")
    alg = settings.algorithms[0]
    issued = int(time.time() if now is None else now)
    claims: dict[str, Any] = {"sub": subject, "iat": issued, "exp": issued + ttl_s, "jti": secrets.token_urlsafe(16)}
    if tenant:
        claims[settings.tenant_claim] = tenant
    if tier:
        claims[settings.tier_claim] = tier
    scope_list = sorted(set(scopes))
    if scope_list:
        claims[settings.scopes_claim] = scope_list
    if settings.issuer:
        claims["iss"] = settings.issuer
    if settings.audience:
        claims["aud"] = settings.audience
    return jwt.encode(claims, _signing_key(settings, alg, secret), algorithm=alg)


def _signing_key(settings: AuthSettings, alg: str, secret: str | None) -> Any:
    if alg in HMAC_ALGORITHMS:
        secret = secret or hmac_secret_from_env(settings)
        if not secret:
            raise ConfigError(f"auth: set the environment variable {settings.secret_env} to the gateway's HMAC secret")
        check_secret_strength(secret, settings.secret_env, [alg])
        return secret
    if not settings.private_key_file:
        raise ConfigError(f"auth.private_key_file: needed to sign {alg} tokens")
    try:
        return Path(settings.private_key_file).read_bytes()
    except OSError as exc:
        raise ConfigError(f"auth.private_key_file: cannot read {settings.private_key_file}: {exc.strerror}") from None


def secret_command(env_name: str) -> str:
    """The exact shell command that sets a good secret."""
    return f"export {env_name}=$(python3 -c 'import secrets; print(secrets.token_urlsafe(48))')"


def ensure_dev_secret(settings: Settings, config_path: str | Path) -> str | None:
    """At `serve` startup: make HS* auth usable when the secret variable is unset.

    With `auth.dev_generate_secret` (default), reuse or generate `.aibox/dev-secret`, export it
    into this process's environment, warn loudly and return a 30-day dev token (scopes `*`) for
    the caller to print. Without it, raise ConfigError with the exact command to run. Returns
    None when nothing had to be done (auth off, asymmetric algorithms, or the variable is set).
    """
    auth = settings.auth
    if not auth.enabled or not (set(auth.algorithms) & HMAC_ALGORITHMS) or hmac_secret_from_env(auth):
        return None
    if not auth.dev_generate_secret:
        raise ConfigError(
            f"auth: the environment variable {auth.secret_env} is not set. Run: {secret_command(auth.secret_env)}"
            " (or set auth.dev_generate_secret = true for local development)"
        )
    path = dev_secret_path(config_path)
    secret = load_or_create_dev_secret(config_path)
    os.environ[auth.secret_env] = secret
    log.warning(
        "\n" + "!" * 72 + f"\n!! {auth.secret_env} is not set: using the DEVELOPMENT secret in {path}"
        f"\n!! For production run: {secret_command(auth.secret_env)}\n" + "!" * 72
    )
    return issue_token(auth, subject="dev", scopes=["*"], ttl_s=DEV_TOKEN_TTL_S, secret=secret)
