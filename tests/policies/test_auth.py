"""JWT verification: a table of forged tokens, scopes, claims mapping, JWKS refresh."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import time
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from gateway.settings import AuthSettings, ConfigError
from policies.auth import AuthError, Authenticator, Principal
from policies.jwks import JwksCache

SECRET = "test-secret-" + "x" * 40
OTHER_SECRET = "other-secret-" + "y" * 40
ENV = "AIBOX_TEST_JWT_SECRET"
ISS, AUD = "https://issuer.test", "aibox-test"


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def hand_signed(header: dict, payload: dict, key: bytes | None) -> str:
    """Build a JWT by hand: pyjwt refuses to produce some forgeries (it is on our side)."""
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(payload).encode())}"
    sig = b"" if key is None else hmac.new(key, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(sig)}"


def claims(**overrides: object) -> dict:
    now = int(time.time())
    base = {"sub": "alice", "exp": now + 3600, "iat": now, "iss": ISS, "aud": AUD, "jti": "j-1", "tenant": "acme",
            "tier": "gold", "scopes": ["model:small"]}  # fmt: skip
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def rsa_public_pem(rsa_key: rsa.RSAPrivateKey) -> bytes:
    return rsa_key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


@pytest.fixture
def hs_auth(monkeypatch: pytest.MonkeyPatch) -> Authenticator:
    monkeypatch.setenv(ENV, SECRET)
    return Authenticator(AuthSettings(algorithms=["HS256"], secret_env=ENV, issuer=ISS, audience=AUD, max_token_bytes=2048))


@pytest.fixture
def rs_auth(tmp_path: Path, rsa_public_pem: bytes) -> Authenticator:
    pem = tmp_path / "pub.pem"
    pem.write_bytes(rsa_public_pem)
    return Authenticator(AuthSettings(algorithms=["RS256"], public_key_file=str(pem), issuer=ISS, audience=AUD))


def good_hs() -> str:
    return jwt.encode(claims(), SECRET, algorithm="HS256")


def test_valid_hs_token_gives_principal(hs_auth: Authenticator) -> None:
    p = hs_auth.authenticate(f"Bearer {good_hs()}")
    assert p == Principal(subject="alice", tenant="acme", tier="gold", scopes=frozenset({"model:small"}), jti="j-1")


def test_valid_rs_token_gives_principal(rs_auth: Authenticator, rsa_key: rsa.RSAPrivateKey) -> None:
    token = jwt.encode(claims(scopes="model:a model:b"), rsa_key, algorithm="RS256")
    assert rs_auth.authenticate(f"bearer {token}").scopes == {"model:a", "model:b"}


# Each row: (id, token factory, expected message fragment). Factories get the RSA material.
FORGED_HS = [
    ("alg-none", lambda k, pem: hand_signed({"alg": "none", "typ": "JWT"}, claims(), None), "algorithm is not accepted"),
    ("alg-None-case", lambda k, pem: hand_signed({"alg": "None"}, claims(), None), "algorithm is not accepted"),
    ("wrong-key", lambda k, pem: jwt.encode(claims(), OTHER_SECRET, algorithm="HS256"), "signature is invalid"),
    ("unlisted-alg-hs512", lambda k, pem: jwt.encode(claims(), SECRET + "z" * 20, algorithm="HS512"), "algorithm is not accepted"),
    ("unlisted-alg-rs256", lambda k, pem: jwt.encode(claims(), k, algorithm="RS256"), "algorithm is not accepted"),
    ("expired", lambda k, pem: jwt.encode(claims(exp=int(time.time()) - 120), SECRET, algorithm="HS256"), "expired"),
    ("missing-exp", lambda k, pem: jwt.encode(claims(exp=None), SECRET, algorithm="HS256"), "'exp'"),
    ("missing-sub", lambda k, pem: jwt.encode(claims(sub=None), SECRET, algorithm="HS256"), "'sub'"),
    ("empty-sub", lambda k, pem: jwt.encode(claims(sub=""), SECRET, algorithm="HS256"), "'sub'"),
    ("future-nbf", lambda k, pem: jwt.encode(claims(nbf=int(time.time()) + 600), SECRET, algorithm="HS256"), "not yet valid"),
    ("wrong-aud", lambda k, pem: jwt.encode(claims(aud="someone-else"), SECRET, algorithm="HS256"), "audience"),
    ("missing-aud", lambda k, pem: jwt.encode(claims(aud=None), SECRET, algorithm="HS256"), "'aud'"),
    ("wrong-iss", lambda k, pem: jwt.encode(claims(iss="https://evil.test"), SECRET, algorithm="HS256"), "issuer"),
    ("tampered-payload", lambda k, pem: tamper(jwt.encode(claims(), SECRET, algorithm="HS256")), "signature is invalid"),
    ("tampered-header-kid", lambda k, pem: retag(jwt.encode(claims(), SECRET, algorithm="HS256")), "signature is invalid"),
    ("stripped-signature", lambda k, pem: jwt.encode(claims(), SECRET, algorithm="HS256").rsplit(".", 1)[0] + ".", "signature"),
    ("garbage", lambda k, pem: "not-a-jwt", "malformed"),
    ("garbage-3-parts", lambda k, pem: "a.b.c", "malformed"),
    ("non-json-header", lambda k, pem: f"{b64(b'xx')}.{b64(b'{}')}.sig", "malformed"),
    ("bad-tenant-type", lambda k, pem: jwt.encode(claims(tenant=7), SECRET, algorithm="HS256"), "'tenant'"),
    ("bad-scopes-type", lambda k, pem: jwt.encode(claims(scopes={"a": 1}), SECRET, algorithm="HS256"), "'scopes'"),
    ("oversized", lambda k, pem: jwt.encode(claims(pad="p" * 4000), SECRET, algorithm="HS256"), "too large"),
]


def tamper(token: str) -> str:
    header, _, sig = token.split(".")
    return f"{header}.{b64(json.dumps(claims(sub='root', scopes=['*'])).encode())}.{sig}"


def retag(token: str) -> str:
    _, payload, sig = token.split(".")
    return f"{b64(json.dumps({'alg': 'HS256', 'kid': 'x'}).encode())}.{payload}.{sig}"


@pytest.mark.parametrize(("token_factory", "fragment"), [r[1:] for r in FORGED_HS], ids=[r[0] for r in FORGED_HS])
def test_forged_tokens_rejected_hs(hs_auth: Authenticator, rsa_key, rsa_public_pem, token_factory, fragment: str) -> None:
    token = token_factory(rsa_key, rsa_public_pem)
    with pytest.raises(AuthError) as info:
        hs_auth.authenticate(f"Bearer {token}")
    assert fragment.lower() in info.value.message.lower()
    assert SECRET not in info.value.message and token not in info.value.message


def test_hs_rs_key_confusion_rejected(rs_auth: Authenticator, rsa_public_pem: bytes) -> None:
    """The classic attack: HS256 'signed' with the server's public RSA key as the HMAC secret."""
    token = hand_signed({"alg": "HS256", "typ": "JWT"}, claims(), rsa_public_pem)
    with pytest.raises(AuthError, match="algorithm is not accepted"):
        rs_auth.authenticate(f"Bearer {token}")


def test_key_confusion_rejected_even_when_both_families_configured(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, rsa_public_pem: bytes
) -> None:
    """With HS256 and RS256 both allowed, HS256 uses the env secret, never the PEM."""
    monkeypatch.setenv(ENV, SECRET)
    pem = tmp_path / "pub.pem"
    pem.write_bytes(rsa_public_pem)
    auth = Authenticator(AuthSettings(algorithms=["RS256", "HS256"], secret_env=ENV, public_key_file=str(pem)))
    token = hand_signed({"alg": "HS256"}, claims(iss=None, aud=None), rsa_public_pem)
    with pytest.raises(AuthError, match="signature is invalid"):
        auth.authenticate(f"Bearer {token}")


def test_rs_token_from_another_key_and_es_token_rejected(rs_auth: Authenticator) -> None:
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    with pytest.raises(AuthError, match="signature is invalid"):
        rs_auth.authenticate("Bearer " + jwt.encode(claims(), other, algorithm="RS256"))
    es = ec.generate_private_key(ec.SECP256R1())
    with pytest.raises(AuthError, match="algorithm is not accepted"):
        rs_auth.authenticate("Bearer " + jwt.encode(claims(), es, algorithm="ES256"))


@pytest.mark.parametrize("header", [None, "", "   ", "Bearer", "Bearer   ", "Basic dXNlcjpwYXNz", "Token abc", "B" * 50_000])
def test_missing_or_malformed_header(hs_auth: Authenticator, header: str | None) -> None:
    with pytest.raises(AuthError):
        hs_auth.authenticate(header)


def test_leeway_accepts_slightly_expired(hs_auth: Authenticator) -> None:
    token = jwt.encode(claims(exp=int(time.time()) - 5), SECRET, algorithm="HS256")
    assert hs_auth.authenticate(f"Bearer {token}").subject == "alice"


def test_configured_extra_required_claim(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV, SECRET)
    auth = Authenticator(AuthSettings(secret_env=ENV, required_claims=["exp", "sub", "jti"]))
    with pytest.raises(AuthError, match="'jti'"):
        auth.authenticate("Bearer " + jwt.encode(claims(jti=None, iss=None, aud=None), SECRET, algorithm="HS256"))


def test_custom_claim_names(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV, SECRET)
    auth = Authenticator(AuthSettings(secret_env=ENV, tenant_claim="org", tier_claim="plan", scopes_claim="scope"))
    token = jwt.encode({"sub": "bob", "exp": int(time.time()) + 60, "org": "o1", "plan": "free", "scope": "model:x"}, SECRET)
    assert auth.authenticate(f"Bearer {token}") == Principal("bob", "o1", "free", frozenset({"model:x"}))


@pytest.mark.parametrize(
    ("scopes", "model", "allowed"),
    [
        ([], "any", True),  # no scopes claim: every model
        (["*"], "any", True),
        (["models:*"], "any", True),
        (["model:small"], "small", True),
        (["small"], "small", True),
        (["model:small"], "large", False),
        (["chat", "model:small"], "large", False),
    ],
)
def test_scopes_gate_models(scopes: list[str], model: str, allowed: bool) -> None:
    assert Principal("s", scopes=frozenset(scopes)).may_use(model) is allowed


def test_startup_errors_are_config_errors(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(ENV, raising=False)
    with pytest.raises(ConfigError, match=ENV):
        Authenticator(AuthSettings(secret_env=ENV))
    monkeypatch.setenv(ENV, "short")
    with pytest.raises(ConfigError, match="at least 32 bytes"):
        Authenticator(AuthSettings(secret_env=ENV))
    monkeypatch.setenv(ENV, SECRET)  # 52 bytes: enough for HS256, not for HS512
    with pytest.raises(ConfigError, match="at least 64 bytes"):
        Authenticator(AuthSettings(secret_env=ENV, algorithms=["HS256", "HS512"]))
    with pytest.raises(ConfigError, match="public_key_file"):
        Authenticator(AuthSettings(algorithms=["RS256"]))
    bad = tmp_path / "bad.pem"
    bad.write_text("not a key")
    with pytest.raises(ConfigError, match="not a PEM public key"):
        Authenticator(AuthSettings(algorithms=["RS256"], public_key_file=str(bad)))


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _jwks(*pairs: tuple[str, rsa.RSAPrivateKey]) -> str:
    keys = []
    for kid, key in pairs:
        jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
        keys.append({**jwk, "kid": kid, "alg": "RS256", "use": "sig"})
    return json.dumps({"keys": keys})


async def test_jwks_unknown_kid_refreshes_at_most_once_per_interval(tmp_path: Path, rsa_key: rsa.RSAPrivateKey) -> None:
    new_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    path = tmp_path / "jwks.json"
    path.write_text(_jwks(("k1", rsa_key)))
    clock = Clock()
    cache = JwksCache(file=str(path), refresh_s=300, clock=clock)
    auth = Authenticator(AuthSettings(algorithms=["RS256"], jwks_file=str(path)), jwks=cache)
    old_token = jwt.encode(claims(iss=None, aud=None), rsa_key, algorithm="RS256", headers={"kid": "k1"})
    new_token = jwt.encode(claims(iss=None, aud=None), new_key, algorithm="RS256", headers={"kid": "k2"})
    assert (await auth.authenticate_async(f"Bearer {old_token}")).subject == "alice"
    path.write_text(_jwks(("k1", rsa_key), ("k2", new_key)))  # the IdP rotates keys
    for _ in range(5):  # a burst of unknown kids inside the interval: no reload
        with pytest.raises(AuthError, match="kid"):
            await auth.authenticate_async(f"Bearer {new_token}")
    assert cache.num_loads == 1
    clock.now += 301
    # Requests that arrive together with the new kid wait for one shared reload, and all pass.
    principals = await asyncio.gather(*(auth.authenticate_async(f"Bearer {new_token}") for _ in range(5)))
    assert {p.subject for p in principals} == {"alice"}
    assert cache.num_loads == 2
    stranger = jwt.encode(claims(iss=None, aud=None), new_key, algorithm="RS256", headers={"kid": "k3"})
    with pytest.raises(AuthError, match="kid"):
        await auth.authenticate_async(f"Bearer {stranger}")
    assert cache.num_loads == 2
    await auth.close()


async def test_jwks_reloads_never_block_the_event_loop(rsa_key: rsa.RSAPrivateKey) -> None:
    """A slow identity provider (0.5 s per fetch): a stale set is refreshed in the background
    while known keys keep verifying at once; a request with a new kid waits for the reload
    without stalling the loop."""
    new_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    served = [_jwks(("k1", rsa_key))]
    fetches: list[float] = []

    def slow_fetch(url: str) -> bytes:
        fetches.append(time.monotonic())
        if len(fetches) > 1:
            time.sleep(0.5)
        return served[-1].encode()

    clock = Clock()
    cache = JwksCache(url="http://idp.invalid/jwks.json", refresh_s=300, fetch=slow_fetch, clock=clock)
    auth = Authenticator(AuthSettings(algorithms=["RS256"], jwks_url="http://idp.invalid/jwks.json"), jwks=cache)
    k1 = jwt.encode(claims(iss=None, aud=None, sub="bob"), rsa_key, algorithm="RS256", headers={"kid": "k1"})
    k2 = jwt.encode(claims(iss=None, aud=None), new_key, algorithm="RS256", headers={"kid": "k2"})
    clock.now += 301  # stale
    started = time.monotonic()
    assert (await auth.authenticate_async(f"Bearer {k1}")).subject == "bob"
    assert time.monotonic() - started < 0.2  # served from the cached set; the reload runs behind
    await cache.refresh()  # let that background reload finish
    assert cache.num_loads == 2
    served.append(_jwks(("k1", rsa_key), ("k2", new_key)))
    clock.now += 301
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    tick_task = asyncio.ensure_future(ticker())
    assert (await auth.authenticate_async(f"Bearer {k2}")).subject == "alice"  # waited for the reload
    tick_task.cancel()
    assert ticks >= 20 and cache.num_loads == 3  # the loop ran during the 0.5 s fetch
    await auth.close()


def test_jwks_key_pinned_to_other_alg_is_not_used(tmp_path: Path, rsa_key: rsa.RSAPrivateKey) -> None:
    path = tmp_path / "jwks.json"
    doc = json.loads(_jwks(("k1", rsa_key)))
    doc["keys"][0]["alg"] = "RS512"
    path.write_text(json.dumps(doc))
    auth = Authenticator(AuthSettings(algorithms=["RS256", "RS512"], jwks_file=str(path)))
    token = jwt.encode(claims(iss=None, aud=None), rsa_key, algorithm="RS256", headers={"kid": "k1"})
    with pytest.raises(AuthError, match="kid"):
        auth.authenticate(f"Bearer {token}")
    ok = jwt.encode(claims(iss=None, aud=None), rsa_key, algorithm="RS512", headers={"kid": "k1"})
    assert auth.authenticate(f"Bearer {ok}").subject == "alice"


def test_cached_verification_still_expires(monkeypatch: pytest.MonkeyPatch) -> None:
    """Verified claims are cached per token string, but `exp` is checked on every use."""
    monkeypatch.setenv(ENV, SECRET)
    auth = Authenticator(AuthSettings(secret_env=ENV, leeway_s=0))
    exp = int(time.time()) + 1
    token = jwt.encode({"sub": "a", "exp": exp}, SECRET, algorithm="HS256")
    auth.authenticate(f"Bearer {token}")
    auth.authenticate(f"Bearer {token}")  # served from the cache
    time.sleep(max(0.0, exp - time.time()) + 0.05)
    with pytest.raises(AuthError, match="expired"):
        auth.authenticate(f"Bearer {token}")


def test_jwks_url_is_fetched_from_a_real_server(rsa_key: rsa.RSAPrivateKey) -> None:
    import http.server
    import threading

    body = _jwks(("k1", rsa_key)).encode()
    hits: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server API)
            hits.append(self.path)
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{httpd.server_address[1]}/.well-known/jwks.json"
        auth = Authenticator(AuthSettings(algorithms=["RS256"], jwks_url=url))
        token = jwt.encode(claims(iss=None, aud=None), rsa_key, algorithm="RS256", headers={"kid": "k1"})
        for _ in range(3):
            assert auth.authenticate(f"Bearer {token}").subject == "alice"
        assert hits == ["/.well-known/jwks.json"]  # fetched once at startup, then cached
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()


async def test_jwks_reload_failures_and_slow_reloads_keep_the_cached_keys(rsa_key: rsa.RSAPrivateKey) -> None:
    import http.client

    calls: list[str] = []
    good = _jwks(("k1", rsa_key)).encode()

    def fetch(url: str) -> bytes:
        calls.append(url)
        if len(calls) == 2:
            raise http.client.IncompleteRead(b"{")  # not an OSError
        if len(calls) == 3:
            time.sleep(1.0)
        return good

    clock = Clock()
    cache = JwksCache(url="http://idp.invalid/jwks.json", refresh_s=300, fetch=fetch, clock=clock)
    auth = Authenticator(AuthSettings(algorithms=["RS256"], jwks_url="http://idp.invalid/jwks.json"), jwks=cache)
    stranger = jwt.encode(claims(iss=None, aud=None), rsa_key, algorithm="RS256", headers={"kid": "k9"})
    clock.now += 301
    with pytest.raises(AuthError, match="kid"):  # the reload failed: a 401, not a 500
        await auth.authenticate_async(f"Bearer {stranger}")
    assert cache.num_loads == 1
    clock.now += 301
    started = time.monotonic()
    await cache.refresh(timeout_s=0.2)  # a slow identity provider: the wait is bounded
    assert time.monotonic() - started < 0.8
    await asyncio.sleep(1.2)
    assert cache.num_loads == 2  # and the reload still completed in the background
    await auth.close()
