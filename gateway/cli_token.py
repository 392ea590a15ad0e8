"""`aibox token create | inspect | revoke`: mint, explain and revoke API keys (JWTs).

    aibox token create --sub alice --tenant acme --tier gold --scopes model:gemma --ttl 30d
    aibox token inspect eyJ...
    aibox token revoke JTI            (or the whole token)

`create` prints only the token on stdout's last line (scripts do `KEY=$(aibox token create ...)`);
everything else goes to stderr. With HS* and no secret variable set, it uses (or creates) the
same `.aibox/dev-secret` as `aibox serve`, so its tokens work against `make run`.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
from pathlib import Path
from typing import Any

import jwt

from gateway.settings import ConfigError, Settings, load


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("token", help="create, inspect and revoke API tokens (JWTs)")
    tsub = p.add_subparsers(dest="token_command", required=True, metavar="SUBCOMMAND")

    create = tsub.add_parser("create", help="sign a token; prints only the token on stdout")
    create.add_argument("--sub", required=True, help="subject (user or service id)")
    create.add_argument("--tenant", default=None, help="tenant / organization")
    create.add_argument("--tier", default=None, help="rate-limit tier name ([ratelimit.tiers.NAME])")
    create.add_argument("--scopes", default="", help="comma-separated scopes, e.g. model:gemma,model:small or *")
    create.add_argument("--ttl", default="30d", help="lifetime: 90s, 15m, 12h, 30d, 1y (default: %(default)s)")
    create.set_defaults(func=create_token)

    inspect = tsub.add_parser("inspect", help="decode a token and say whether this gateway accepts it")
    inspect.add_argument("token")
    inspect.set_defaults(func=inspect_token)

    revoke = tsub.add_parser("revoke", help="add a token id (jti) to the deny list; running gateways see it within 1 s")
    revoke.add_argument("jti", help="the token's jti claim, or the token itself")
    revoke.add_argument("--reason", default=None)
    revoke.set_defaults(func=revoke_token)

    for parser in (create, inspect, revoke):
        parser.add_argument("--config", default="config.toml", help="path to config.toml (default: %(default)s)")


def _err(message: str) -> int:
    print(f"aibox token: {message}", file=sys.stderr)
    return 1


def _load(path: str) -> Settings:
    if not Path(path).exists() and path == "config.toml":
        return Settings()  # no config at all: the built-in defaults (HS256, AIBOX_JWT_SECRET)
    return load(path)


def create_token(args: argparse.Namespace) -> int:
    from policies.tokens import issue_token, load_or_create_dev_secret, parse_ttl, signing_secret

    try:
        settings = _load(args.config)
        ttl_s = parse_ttl(args.ttl)
        auth = settings.auth
        secret = None
        if auth.algorithms[0].startswith("HS"):
            secret = signing_secret(auth, args.config)
            if secret is None and auth.dev_generate_secret:
                secret = load_or_create_dev_secret(args.config)
                print(f"note: {auth.secret_env} is not set; signed with the development secret (.aibox/dev-secret)", file=sys.stderr)
        scopes = [s.strip() for s in args.scopes.split(",") if s.strip()]
        token = issue_token(
            auth, subject=args.sub, tenant=args.tenant, tier=args.tier, scopes=scopes, ttl_s=ttl_s, secret=secret
        )
    except (ConfigError, ValueError) as exc:
        return _err(str(exc))
    for note in _notes(settings, args.tier, scopes):
        print(f"note: {note}", file=sys.stderr)
    claims = jwt.decode(token, options={"verify_signature": False})
    expires = dt.datetime.fromtimestamp(claims["exp"], dt.UTC).isoformat(timespec="seconds")
    print(f"jti={claims['jti']} expires={expires}", file=sys.stderr)
    print(token, flush=True)
    return 0


def _notes(settings: Settings, tier: str | None, scopes: list[str]) -> list[str]:
    """Likely mistakes worth a word (the token is still issued: config may change later)."""
    notes = []
    tiers = settings.ratelimit.tiers
    if tier and tiers and tier not in tiers:
        notes.append(f"tier {tier!r} is not in [ratelimit.tiers] ({', '.join(sorted(tiers))}); the default tier applies")
    names = {n for m in settings.models for n in (m.name, *m.aliases)}
    unknown = [s for s in scopes if s.startswith("model:") and names and s[6:] not in names]
    if unknown:
        notes.append(f"scopes name unknown models: {', '.join(unknown)}")
    return notes


def inspect_token(args: argparse.Namespace) -> int:
    """Print header and claims, then the verdict of this config's verifier. Exit 1 if rejected."""
    from policies.auth import AuthError, build_authenticator
    from policies.tokens import signing_secret

    try:
        header = jwt.get_unverified_header(args.token)
        claims = jwt.decode(args.token, options={"verify_signature": False})
    except jwt.PyJWTError as exc:
        return _err(f"not a JWT: {exc}")
    report: dict[str, Any] = {"header": header, "claims": claims}
    for name in ("iat", "nbf", "exp"):
        if isinstance(claims.get(name), int | float):
            report[f"{name}_utc"] = dt.datetime.fromtimestamp(claims[name], dt.UTC).isoformat(timespec="seconds")
    try:
        settings = _load(args.config)
        secret = signing_secret(settings.auth, args.config)
        if secret and not os.environ.get(settings.auth.secret_env):
            os.environ[settings.auth.secret_env] = secret  # the dev secret, as `aibox serve` would use
        principal = build_authenticator(settings).authenticate(f"Bearer {args.token}")
        report["verdict"] = "accepted"
        report["principal"] = {"subject": principal.subject, "tenant": principal.tenant, "tier": principal.tier,
                               "scopes": sorted(principal.scopes), "jti": principal.jti}  # fmt: skip
    except AuthError as exc:
        report["verdict"] = f"rejected: {exc.message}"
    except ConfigError as exc:
        report["verdict"] = f"cannot verify: {exc}"
    print(json.dumps(report, indent=2, default=str))
    return 0 if report["verdict"] == "accepted" else 1


def revoke_token(args: argparse.Namespace) -> int:
    from policies.revocation import RevocationList, revocation_path

    jti = args.jti
    if jti.count(".") == 2:  # a whole token was pasted: take its jti
        try:
            jti = jwt.decode(jti, options={"verify_signature": False}).get("jti")
        except jwt.PyJWTError as exc:
            return _err(f"not a JWT: {exc}")
        if not isinstance(jti, str) or not jti:
            return _err("this token has no jti claim, so it cannot be revoked; rotate the signing key instead")
    try:
        settings = _load(args.config)
    except ConfigError as exc:
        return _err(str(exc))
    path = revocation_path(settings.auth.revocation_path, settings.audit.path)
    added = RevocationList(path).revoke(jti, reason=args.reason)
    print(f"{'revoked' if added else 'already revoked'}: {jti} (deny list: {path})")
    return 0
