"""config.toml -> typed, validated settings.

Loaded once and strictly: an unknown key, a wrong type or a dangling reference is a
`ConfigError` whose message names the section and key. Relative paths are resolved against
the folder of the config file. Secrets never live in the file: it names environment variables.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Annotated, Literal

import msgspec
from msgspec import Meta, Struct, field

PositiveInt = Annotated[int, Meta(ge=1)]
NonNegInt = Annotated[int, Meta(ge=0)]
PositiveFloat = Annotated[float, Meta(gt=0)]
NonNegFloat = Annotated[float, Meta(ge=0)]

BUNDLED_MODEL = "bundled:gemma3-270m"


class ConfigError(ValueError):
    """A config file that cannot be served; the message names the offending key."""


class _Strict(Struct, forbid_unknown_fields=True, kw_only=True):
    pass


# --------------------------------------------------------------------------- [server]
class ServerSettings(_Strict):
    host: str = "127.0.0.1"
    port: Annotated[int, Meta(ge=0, le=65535)] = 8000
    max_body_bytes: PositiveInt = 1_048_576
    max_n: PositiveInt = 8
    max_messages: PositiveInt = 512
    max_tokens_cap: PositiveInt = 32_768  # hard ceiling on max_tokens a client may ask for
    request_timeout_s: PositiveFloat = 600.0  # total deadline of one request
    idle_timeout_s: PositiveFloat = 120.0  # longest gap between two chunks from a backend
    keepalive_s: PositiveFloat = 15.0  # SSE comment sent while waiting on a long prefill
    shutdown_timeout_s: NonNegFloat = 30.0
    log_format: Literal["text", "json"] = "text"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    config_watch_s: NonNegFloat = 0.0  # > 0: poll the config file every N s and hot-reload on change (SIGHUP always works)


# --------------------------------------------------------------------------- [auth]
class AuthSettings(_Strict):
    enabled: bool = True
    algorithms: list[str] = field(default_factory=lambda: ["HS256"])
    secret_env: str = "AIBOX_JWT_SECRET"  # HS*: name of the env var holding the secret
    public_key_file: str | None = None  # RS*/ES*/EdDSA verification key (PEM)
    private_key_file: str | None = None  # used by `aibox token create` for asymmetric algs
    jwks_file: str | None = None
    jwks_url: str | None = None
    jwks_refresh_s: PositiveFloat = 300.0
    issuer: str | None = None
    audience: str | None = None
    leeway_s: NonNegFloat = 30.0
    required_claims: list[str] = field(default_factory=lambda: ["exp", "sub"])
    tenant_claim: str = "tenant"
    tier_claim: str = "tier"
    scopes_claim: str = "scopes"
    max_token_bytes: PositiveInt = 8192
    # Where `aibox token revoke` writes the deny list (SQLite). Default: beside the audit db.
    revocation_path: str | None = None
    dev_generate_secret: bool = True  # `make run` with no secret set: generate one and print a token


# --------------------------------------------------------------------------- [ratelimit]
class LimitSet(_Strict):
    """Budgets per minute; 0 means unlimited."""

    requests_per_minute: NonNegInt = 0
    tokens_per_minute: NonNegInt = 0
    max_concurrent: NonNegInt = 0


class TierSettings(_Strict):
    principal: LimitSet = field(default_factory=LimitSet)  # per subject
    tenant: LimitSet = field(default_factory=LimitSet)  # per tenant
    model: LimitSet = field(default_factory=LimitSet)  # per (subject, model)
    models: dict[str, LimitSet] = field(default_factory=dict)  # per-model overrides of `model`


class RateLimitSettings(_Strict):
    enabled: bool = True
    store: Literal["memory", "redis"] = "memory"
    redis_url_env: str = "AIBOX_REDIS_URL"
    redis_url: str | None = None  # used when the env var is unset; never put passwords here
    fail_open: bool = True  # when Redis is unreachable: admit (True) or reject with 503 (False)
    default_tier: str = "default"
    max_tokens_estimate: PositiveInt = 4096  # reservation when the request sets no max_tokens
    tiers: dict[str, TierSettings] = field(default_factory=dict)


# --------------------------------------------------------------------------- [audit]
class QuotaSettings(_Strict):
    tokens_per_day: NonNegInt = 0  # 0 means unlimited
    tokens_per_month: NonNegInt = 0


class AuditSettings(_Strict):
    enabled: bool = True
    path: str = "aibox-usage.db"
    store_content: bool = False
    retention_days: NonNegInt = 0  # 0: keep forever; else prune automatically
    buffer_rows: PositiveInt = 100_000  # rows held in memory while the disk is failing
    # "normal": a committed row survives the process being killed (not a power cut); "full": fsync per commit
    synchronous: Literal["normal", "full"] = "normal"
    tenant_quotas: dict[str, QuotaSettings] = field(default_factory=dict)
    subject_quotas: dict[str, QuotaSettings] = field(default_factory=dict)


# --------------------------------------------------------------------------- [backends.NAME]
class _Backend(_Strict, tag_field="type"):
    model_id: str | None = None  # name reported in /v1/models detail; default derived from model
    queue_size: NonNegInt = 256  # requests waiting beyond this get 503 + Retry-After


class FakeBackendConfig(_Backend, tag="fake"):
    """Deterministic scripted output: for tests, benchmarks and demos."""

    script: str = "The quick brown fox jumps over the lazy dog. "
    context_length: PositiveInt = 4096
    tokens_per_s: NonNegFloat = 0.0  # 0: as fast as possible
    first_token_delay_s: NonNegFloat = 0.0
    max_concurrent: NonNegInt = 0  # 0: unlimited
    fail_after_tokens: NonNegInt = 0  # > 0: this deployment dies (retriably) after N tokens; fault tests


class LlamaCppBackendConfig(_Backend, tag="llamacpp"):
    model: str = BUNDLED_MODEL  # a .gguf path or "bundled:gemma3-270m"
    n_ctx: PositiveInt = 4096
    n_threads: PositiveInt | None = None
    n_threads_batch: PositiveInt | None = None  # threads for multi-token steps; default: n_threads, else all CPUs
    n_batch: PositiveInt = 512
    n_gpu_layers: int = 0
    parallel: PositiveInt = 4  # sequences decoded together in one llama_decode
    chat_template: str | None = None  # Jinja; default: the GGUF's own, else a Gemma turn template
    prefix_cache: bool = True


class TorchBackendConfig(_Backend, tag="torch"):
    model: str = BUNDLED_MODEL  # HF model dir, .gguf file, or "bundled:gemma3-270m"
    device: str = "cpu"  # cpu, cuda, cuda:N
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    max_num_seqs: PositiveInt = 16
    max_num_batched_tokens: PositiveInt = 2048
    max_model_len: PositiveInt | None = None
    num_kv_blocks: PositiveInt | None = None  # None: sized from max_num_seqs * max_model_len
    block_size: PositiveInt = 16
    chat_template: str | None = None
    store_dir: str = ".aibox/models"  # converted-weights cache, keyed by file hash
    num_threads: PositiveInt | None = None  # torch intra-op threads on CPU (process-wide); None: torch's default
    num_speculative_tokens: NonNegInt = 0  # prompt-lookup drafts per greedy decode step; 0: off


class OpenAIBackendConfig(_Backend, tag="openai", kw_only=True):
    base_url: str
    model: str  # model name sent upstream
    api_key_env: str | None = None
    context_length: PositiveInt = 8192
    connect_timeout_s: PositiveFloat = 5.0
    first_token_timeout_s: PositiveFloat = 60.0
    idle_timeout_s: PositiveFloat = 60.0
    total_timeout_s: PositiveFloat = 600.0
    max_connections: PositiveInt = 256


BackendConfig = FakeBackendConfig | LlamaCppBackendConfig | TorchBackendConfig | OpenAIBackendConfig


# --------------------------------------------------------------------------- [[models]], [[routes]]
class DeploymentRef(_Strict):
    backend: str
    weight: NonNegFloat = 1.0
    priority: int = 0


class ModelSettings(_Strict, kw_only=True):
    name: str
    aliases: list[str] = field(default_factory=list)
    deployments: list[DeploymentRef]
    strategy: Literal["weighted", "least_busy", "latency", "priority"] = "weighted"
    fallbacks: list[str] = field(default_factory=list)
    retries: NonNegInt = 2  # extra deployments tried after the first fails
    timeout_s: PositiveFloat | None = None  # overrides server.request_timeout_s
    allowed_fails: PositiveInt = 3  # failures within cooldown_s that put a deployment in cooldown
    cooldown_s: NonNegFloat = 30.0
    context_length: PositiveInt | None = None  # advertised; default: the smallest deployment's


class RouteMatch(_Strict):
    tenant: str | None = None
    subject: str | None = None
    scope: str | None = None


class RouteRule(_Strict):
    """Per-tenant rules, first match wins: restrict models and/or pin to deployments."""

    match: RouteMatch
    models: list[str] | None = None  # models this principal may use (None: unrestricted)
    deployments: list[str] | None = None  # backend names this principal is pinned to


class Settings(_Strict):
    server: ServerSettings = field(default_factory=ServerSettings)
    auth: AuthSettings = field(default_factory=AuthSettings)
    ratelimit: RateLimitSettings = field(default_factory=RateLimitSettings)
    audit: AuditSettings = field(default_factory=AuditSettings)
    backends: dict[str, BackendConfig] = field(default_factory=dict)
    models: list[ModelSettings] = field(default_factory=list)
    routes: list[RouteRule] = field(default_factory=list)


# --------------------------------------------------------------------------- loading
_PATH_KEYS = {"model", "path", "public_key_file", "private_key_file", "jwks_file", "revocation_path", "store_dir"}


def _resolve_paths(obj: object, base: Path) -> object:
    """Rewrite relative path-valued fields against the config file's folder."""
    if isinstance(obj, dict):
        return {k: _resolve_paths(v, base) if not isinstance(v, str) or k not in _PATH_KEYS else _abs(v, base) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_resolve_paths(v, base) for v in obj]
    return obj


def _abs(value: str, base: Path) -> str:
    if ":" in value and not Path(value).exists() and not value.startswith(("./", "../")):
        return value  # a reference such as bundled:gemma3-270m, or an HF id-like string
    p = Path(value).expanduser()
    return str(p if p.is_absolute() else (base / p).resolve())


def parse(data: dict, *, base_dir: Path | None = None) -> Settings:
    """Validate an already-parsed TOML document."""
    if base_dir is not None:
        data = _resolve_paths(data, base_dir)  # type: ignore[assignment]
    _check_keyed_tables(data)
    try:
        settings = msgspec.convert(data, Settings, strict=True)
    except msgspec.ValidationError as exc:
        raise ConfigError(_humanize(str(exc))) from None
    validate(settings)
    return settings


def _check_keyed_tables(data: dict) -> None:
    """msgspec reports a bad entry of a keyed table as `backends[...]`; check entries one by one
    so the message names the key the admin wrote."""
    tables: list[tuple[str, object, type]] = [("backends", data.get("backends"), BackendConfig)]  # type: ignore[list-item]
    ratelimit = data.get("ratelimit") if isinstance(data.get("ratelimit"), dict) else {}
    tiers = ratelimit.get("tiers") if isinstance(ratelimit.get("tiers"), dict) else {}
    for name, tier in tiers.items():
        if isinstance(tier, dict):
            tables.append((f"ratelimit.tiers.{name}.models", tier.get("models"), LimitSet))
    tables.append(("ratelimit.tiers", tiers, TierSettings))
    audit = data.get("audit") if isinstance(data.get("audit"), dict) else {}
    tables += [(f"audit.{k}", audit.get(k), QuotaSettings) for k in ("tenant_quotas", "subject_quotas")]
    for path, table, typ in tables:
        if not isinstance(table, dict):
            continue
        for key, value in table.items():
            try:
                msgspec.convert(value, typ, strict=True)
            except msgspec.ValidationError as exc:
                raise ConfigError(_humanize(str(exc), prefix=f"{path}.{key}")) from None


def load(path: str | Path) -> Settings:
    """Read and validate config.toml; raise ConfigError naming the problem."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    try:
        return parse(data, base_dir=path.resolve().parent)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def _humanize(msg: str, prefix: str = "") -> str:
    """msgspec's "Object contains unknown field `x` - at `$.server`" -> "... (at `server`)"."""
    text, sep, path = msg.partition(" - at `")
    if not sep:
        return f"{text} (at `{prefix}`)" if prefix else text
    path = path.rstrip("`").removeprefix("$")
    where = (prefix + path) if prefix else path.removeprefix(".")
    return f"{text} (at `{where or 'top level'}`)"


def validate(settings: Settings) -> None:
    """Cross-references msgspec cannot check."""
    names: dict[str, str] = {}
    for i, model in enumerate(settings.models):
        where = f"models[{i}] ({model.name!r})"
        if not model.deployments:
            raise ConfigError(f"{where}: deployments must list at least one backend")
        for j, dep in enumerate(model.deployments):
            if dep.backend not in settings.backends:
                known = ", ".join(sorted(settings.backends)) or "none defined"
                raise ConfigError(f"{where}.deployments[{j}].backend: unknown backend {dep.backend!r} (known: {known})")
        if model.strategy == "weighted" and sum(d.weight for d in model.deployments) <= 0:
            raise ConfigError(f"{where}.deployments: at least one weight must be > 0")
        for public in [model.name, *model.aliases]:
            if public in names:
                raise ConfigError(f"{where}: name or alias {public!r} already used by model {names[public]!r}")
            names[public] = model.name
    for i, model in enumerate(settings.models):
        for fb in model.fallbacks:
            if fb not in names:
                raise ConfigError(f"models[{i}] ({model.name!r}).fallbacks: unknown model {fb!r}")
            if names[fb] == model.name:
                raise ConfigError(f"models[{i}] ({model.name!r}).fallbacks: a model cannot fall back to itself")
    for i, rule in enumerate(settings.routes):
        for m in rule.models or []:
            if m not in names:
                raise ConfigError(f"routes[{i}].models: unknown model {m!r}")
        for b in rule.deployments or []:
            if b not in settings.backends:
                raise ConfigError(f"routes[{i}].deployments: unknown backend {b!r}")
    if settings.ratelimit.default_tier not in settings.ratelimit.tiers and settings.ratelimit.tiers:
        raise ConfigError(f"ratelimit.default_tier: tier {settings.ratelimit.default_tier!r} is not defined in [ratelimit.tiers]")
    bad_algs = [a for a in settings.auth.algorithms if a not in _ALLOWED_ALGS]
    if bad_algs:
        raise ConfigError(f"auth.algorithms: unsupported {bad_algs} (choose from {sorted(_ALLOWED_ALGS)})")
    if not settings.auth.algorithms:
        raise ConfigError("auth.algorithms: list at least one algorithm")


_ALLOWED_ALGS = {"HS256", "HS384", "HS512", "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
