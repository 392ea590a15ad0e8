"""Bearer JWT -> Principal.

`Authenticator.authenticate(header)` verifies an `Authorization: Bearer <jwt>` header and returns
the caller's `Principal`, or raises `AuthError` whose message is safe to show the client (it never
contains key material or the token).

Security choices:
- The algorithm list comes from config; the token's `alg` header only selects among them. The
  key is chosen by algorithm family from config (HS* -> the secret from `auth.secret_env`;
  others -> `public_key_file` or the JWKS), so a token cannot make us use an RSA public key as
  an HMAC secret (key confusion) and `alg: none` is never accepted.
- Oversized tokens are rejected before any parsing (`auth.max_token_bytes`).
- HMAC secrets shorter than 32 bytes are refused at startup.
- Revoked `jti`s are answered from a polled in-memory set (`policies.revocation`).
- Verified claims are cached per exact token string for 60 s (clients resend the same key);
  `exp` and revocation are still checked on every use.
"""

from __future__ import annotations

import logging
import os
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt

from gateway.settings import AuthSettings, ConfigError, Settings
from policies.jwks import JwksCache, RefreshNeeded
from policies.revocation import RevocationList, revocation_path

log = logging.getLogger("aibox.auth")

HMAC_ALGORITHMS = frozenset({"HS256", "HS384", "HS512"})
# RFC 7518 §3.2: an HMAC key at least as long as the hash output (pyjwt warns below that).
MIN_SECRET_BYTES = {"HS256": 32, "HS384": 48, "HS512": 64}
# Clients send the same token on every request; verified claims are remembered (exact token
# string -> claims) for a while, with `exp` and revocation still checked on every use.
_CACHE_SIZE = 4096
_CACHE_TTL_S = 60.0


class AuthError(Exception):
    """A missing or invalid credential (HTTP 401). `message` is safe to send to the client."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: taken from verified token claims (or anonymous when auth is off)."""

    subject: str
    tenant: str | None = None
    tier: str | None = None
    scopes: frozenset[str] = field(default_factory=frozenset)
    jti: str | None = None

    def may_use(self, model: str) -> bool:
        """Scopes name models (`model:NAME` or a bare NAME) or grant all (`*`, `models:*`)."""
        if not self.scopes or "*" in self.scopes or "models:*" in self.scopes:
            return True
        return model in self.scopes or f"model:{model}" in self.scopes


ANONYMOUS = Principal(subject="anonymous")

# pyjwt exception -> client-safe message. Order matters: subclasses before their bases.
_JWT_ERRORS: list[tuple[type[Exception], str]] = [
    (jwt.ExpiredSignatureError, "Token has expired."),
    (jwt.ImmatureSignatureError, "Token is not yet valid (nbf/iat in the future)."),
    (jwt.InvalidAudienceError, "Token audience is not accepted."),
    (jwt.InvalidIssuerError, "Token issuer is not accepted."),
    (jwt.InvalidSignatureError, "Token signature is invalid."),
    (jwt.InvalidAlgorithmError, "Token algorithm is not accepted."),
    (jwt.DecodeError, "Token is malformed."),
]


def hmac_secret_from_env(settings: AuthSettings) -> str | None:
    """The HS* secret from the environment variable named by `auth.secret_env`, if set."""
    return os.environ.get(settings.secret_env) or None


def check_secret_strength(secret: str, env_name: str, algorithms: list[str]) -> None:
    """Refuse HMAC secrets shorter than the longest configured HS* hash output."""
    need = max((MIN_SECRET_BYTES[a] for a in algorithms if a in MIN_SECRET_BYTES), default=32)
    if len(secret.encode()) < need:
        raise ConfigError(f"auth.secret_env: the secret in ${env_name} must be at least {need} bytes long for {'/'.join(algorithms)}")


class Authenticator:
    """Verifies bearer JWTs against the configured algorithms and keys."""

    def __init__(
        self,
        settings: AuthSettings,
        *,
        revocations: RevocationList | None = None,
        jwks: JwksCache | None = None,
    ) -> None:
        self.settings = settings
        self.revocations = revocations
        self._algorithms = frozenset(settings.algorithms)
        self._secret: str | None = None
        self._public_key: Any = None
        self._jwks = jwks
        self._cache: OrderedDict[str, tuple[float, int | None, dict[str, Any]]] = OrderedDict()
        if self._algorithms & HMAC_ALGORITHMS:
            secret = hmac_secret_from_env(settings)
            if secret is None:
                raise ConfigError(f"auth: HS* algorithms are configured but the environment variable {settings.secret_env} is not set")
            check_secret_strength(secret, settings.secret_env, settings.algorithms)
            self._secret = secret
        if self._algorithms - HMAC_ALGORITHMS:
            if settings.public_key_file:
                self._public_key = _load_public_key(settings.public_key_file)
            if self._jwks is None and (settings.jwks_file or settings.jwks_url):
                self._jwks = JwksCache(file=settings.jwks_file, url=settings.jwks_url, refresh_s=settings.jwks_refresh_s)
            if self._public_key is None and self._jwks is None:
                raise ConfigError("auth: asymmetric algorithms need auth.public_key_file, auth.jwks_file or auth.jwks_url")
        # exp and sub are always required; config may add more (e.g. jti, iat).
        self._options: dict[str, Any] = {"require": list(dict.fromkeys(["exp", "sub", *settings.required_claims]))}

    async def close(self) -> None:
        """Stop the JWKS refresh thread, if any."""
        if self._jwks is not None:
            self._jwks.close()

    async def authenticate_async(self, header: str | None) -> Principal:
        """`authenticate()` for the event loop: when the token names a JWKS key we do not have
        and a key-set reload is allowed, wait for that reload (off the loop) and verify again."""
        try:
            return self.authenticate(header)
        except RefreshNeeded:
            assert self._jwks is not None
            await self._jwks.refresh()
        try:
            return self.authenticate(header)
        except RefreshNeeded:  # a reload is running again already: do not wait twice
            raise AuthError("Token key id (kid) is unknown.") from None

    def authenticate(self, header: str | None) -> Principal:
        """`Authorization` header value -> Principal; raises AuthError (401) otherwise, or
        RefreshNeeded (JWKS only; see `authenticate_async`, which handles it)."""
        if not header or not header.strip():
            raise AuthError("Missing bearer token: send your API key as 'Authorization: Bearer <token>'.")
        # Size first: nothing is parsed (not even split) for absurdly large input.
        if len(header) > self.settings.max_token_bytes + 16:
            raise AuthError("Token is too large.")
        scheme, _, token = header.strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise AuthError("Authorization header must have the form 'Bearer <token>'.")
        if len(token.encode()) > self.settings.max_token_bytes:
            raise AuthError("Token is too large.")
        claims = self.verify(token)
        return self._principal(claims)

    def verify(self, token: str) -> dict[str, Any]:
        """Check signature and claims of a raw JWT; return its claims or raise AuthError."""
        now = time.time()
        cached = self._cache.get(token)
        if cached is not None and now - cached[0] < _CACHE_TTL_S:
            _, exp, claims = cached
            if exp is not None and exp <= now - self.settings.leeway_s:
                del self._cache[token]
                raise AuthError("Token has expired.")
            self._cache.move_to_end(token)
        else:
            claims = self._verify_signature_and_claims(token)
            # pyjwt accepted `exp`, so int() works (it may have been a numeric string)
            self._cache[token] = (now, int(claims["exp"]) if "exp" in claims else None, claims)
            if len(self._cache) > _CACHE_SIZE:
                self._cache.popitem(last=False)
        jti = claims.get("jti")
        if self.revocations is not None and isinstance(jti, str) and self.revocations.is_revoked(jti):
            raise AuthError("Token has been revoked.")
        return claims

    def _verify_signature_and_claims(self, token: str) -> dict[str, Any]:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise AuthError("Token is malformed.") from None
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self._algorithms:
            raise AuthError("Token algorithm is not accepted.")
        key = self._key_for(alg, header.get("kid"))
        s = self.settings
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=[alg],  # exactly the one configured alg the key was chosen for
                options=self._options,  # type: ignore[arg-type]
                audience=s.audience,
                issuer=s.issuer,
                leeway=s.leeway_s,
            )
        except jwt.MissingRequiredClaimError as exc:
            raise AuthError(f"Token is missing the required '{exc.claim}' claim.") from None
        except jwt.PyJWTError as exc:
            raise AuthError(_message_for(exc)) from None
        self._principal(claims)  # claim types are checked before the claims are cached
        return claims

    def _key_for(self, alg: str, kid: object) -> Any:
        if alg in HMAC_ALGORITHMS:
            return self._secret
        if self._jwks is not None and (kid is not None or self._public_key is None):
            if not isinstance(kid, str | None):
                raise AuthError("Token key id (kid) is invalid.")
            key = self._jwks.key_for(kid, alg)
            if key is None:
                raise AuthError("Token key id (kid) is unknown.")
            return key
        return self._public_key

    def _principal(self, claims: dict[str, Any]) -> Principal:
        s = self.settings
        subject = claims.get("sub")
        if not isinstance(subject, str) or not subject:
            raise AuthError("Token claim 'sub' must be a non-empty string.")
        jti = claims.get("jti")
        return Principal(
            subject=subject,
            tenant=_optional_str(claims, s.tenant_claim),
            tier=_optional_str(claims, s.tier_claim),
            scopes=_scopes(claims.get(s.scopes_claim), s.scopes_claim),
            jti=jti if isinstance(jti, str) else None,
        )


def _message_for(exc: Exception) -> str:
    for cls, message in _JWT_ERRORS:
        if isinstance(exc, cls):
            return message
    return "Token is invalid."


def _optional_str(claims: dict[str, Any], name: str) -> str | None:
    value = claims.get(name)
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise AuthError(f"Token claim '{name}' must be a non-empty string.")
    return value


def _scopes(value: object, name: str) -> frozenset[str]:
    """Scopes as a JSON list of strings or an OAuth-style space-separated string."""
    if value is None:
        return frozenset()
    if isinstance(value, str):
        return frozenset(value.split())
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return frozenset(value)
    raise AuthError(f"Token claim '{name}' must be a list of strings or a space-separated string.")


def _load_public_key(path: str) -> Any:
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"auth.public_key_file: cannot read {path}: {exc.strerror}") from None
    try:
        return load_pem_public_key(data)
    except ValueError:
        raise ConfigError(f"auth.public_key_file: {path} is not a PEM public key") from None


def warn_if_disabled(settings: AuthSettings) -> bool:
    """Log a loud warning when auth is off (call once at startup); True when it is off."""
    if settings.enabled:
        return False
    log.warning(
        "\n" + "!" * 72 + "\n!! auth.enabled = false: EVERY request is accepted as 'anonymous' with all models."
        "\n!! Use this only on a trusted machine; never expose this gateway to a network.\n" + "!" * 72
    )
    return True


def build_authenticator(settings: Settings) -> Authenticator:
    """The Authenticator `[auth]` asks for, with the deny list beside the audit database."""
    revocations = RevocationList(revocation_path(settings.auth.revocation_path, settings.audit.path))
    return Authenticator(settings.auth, revocations=revocations)


def ensure_dev_secret(settings: Settings, config_path: str | Path) -> str | None:
    """See `policies.tokens.ensure_dev_secret` (re-exported here for `aibox serve`)."""
    from policies.tokens import ensure_dev_secret as ensure

    return ensure(settings, config_path)
