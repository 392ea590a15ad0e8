"""(model name, Principal, live deployment state) -> the ordered deployments to try.

Plain code: no web framework, no I/O. The gateway calls, per request:

    attempts = router.plan(model_name, principal)     # or ModelNotFoundError / ModelForbiddenError
    for attempt in attempts:
        router.begin(attempt.backend)
        ... generate ...
        router.end(attempt.backend, ok=..., ttft_s=..., retriable_failure=...)

Ordering, per model (`[[models]].strategy`):
  weighted    weighted random order without replacement (Efraimidis-Spirakis keys); weight 0 = standby
  least_busy  fewest in-flight requests (counted by begin/end); ties broken at random
  latency     lowest EWMA of time-to-first-token; deployments never measured go first (exploration)
  priority    lowest `priority` value first; equal priorities are weighted-random among themselves
Deployments in cooldown (or whose backend reports not ready) are moved behind the healthy ones, so
they are still tried when nothing healthy is left. The list is cut to 1 + `retries` deployments, then
each fallback model's own plan is appended (marked `is_fallback`).

Tenant rules (`[[routes]]`, first match wins) restrict which models a principal may use (403) and/or
pin it to a subset of backends. Token scopes are checked with `Principal.may_use`.

Cooldown: `allowed_fails` retriable failures within `cooldown_s` put a backend in cooldown for
`cooldown_s`; any success clears its failure count and cooldown. State is per backend (a backend can
serve several models); when models sharing a backend disagree, the strictest setting wins (fewest
allowed fails, longest cooldown).

All methods run on the event loop thread; nothing here needs a lock.
"""

from __future__ import annotations

import math
import random
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gateway.settings import DeploymentRef, ModelSettings, RouteRule, Settings
    from policies.auth import Principal

EWMA_ALPHA = 0.3  # weight of the newest TTFT sample: reacts within a few requests, damps one outlier


class RoutingError(Exception):
    """Base of routing refusals; `message` is safe to show to the client."""

    def __init__(self, message: str, model: str) -> None:
        super().__init__(message)
        self.message = message
        self.model = model


class ModelNotFoundError(RoutingError):
    """No model or alias has this name (404 model_not_found)."""


class ModelForbiddenError(RoutingError):
    """The model exists but this principal may not use it (403)."""


@dataclass(frozen=True, slots=True)
class Attempt:
    """One deployment to try: the model it serves, the backend name, and why it is in this place."""

    model: ModelSettings
    backend: str
    is_fallback: bool = False
    reason: str = ""


@dataclass(slots=True)
class DeploymentState:
    """Live facts about one backend, shared by every Router built from the same lineage."""

    in_flight: int = 0
    ewma_ttft_s: float | None = None
    fail_times: deque[float] = field(default_factory=deque)
    cooling_until: float | None = None
    num_requests: int = 0
    num_failures: int = 0


@dataclass(frozen=True, slots=True)
class _CooldownPolicy:
    allowed_fails: int
    cooldown_s: float


class Router:
    """Turns a public model name and a principal into the ordered deployments to try."""

    def __init__(
        self,
        settings: Settings,
        backends: Mapping[str, Any] | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
        states: dict[str, DeploymentState] | None = None,
    ) -> None:
        self.settings = settings
        self._backends = backends
        self._clock = clock
        self._rng = rng if rng is not None else random.Random()
        self._by_name: dict[str, ModelSettings] = {}
        for model in settings.models:
            for public in (model.name, *model.aliases):
                self._by_name[public] = model
        self._cooldown = _cooldown_policies(settings.models)
        shared = states if states is not None else {}
        self._states = {name: shared.get(name) or DeploymentState() for name in settings.backends}

    # ------------------------------------------------------------------ reconfiguration
    def reconfigure(
        self, settings: Settings, backends: Mapping[str, Any] | None = None, *, keep: Iterable[str] | None = None
    ) -> Router:
        """A Router for new settings that keeps the live state (in-flight, latency, cooldowns) of the
        backends named in `keep` (default: all present in both), so a hot reload neither forgets a sick
        backend nor miscounts load. Backends that were replaced should not be kept: fresh process, fresh state."""
        names = set(self._states) if keep is None else set(keep)
        shared = {n: st for n, st in self._states.items() if n in names}
        return Router(settings, backends, clock=self._clock, rng=self._rng, states=shared)

    # ------------------------------------------------------------------ lookups
    def resolve(self, model_name: str) -> ModelSettings:
        """The model a public name or alias refers to, or ModelNotFoundError."""
        try:
            return self._by_name[model_name]
        except KeyError:
            raise ModelNotFoundError(
                f"The model '{model_name}' does not exist or you do not have access to it.", model_name
            ) from None

    def rule_for(self, principal: Principal | None) -> RouteRule | None:
        """The first `[[routes]]` rule matching the principal, if any."""
        if principal is None:
            return None
        for rule in self.settings.routes:
            m = rule.match
            if m.tenant is not None and m.tenant != principal.tenant:
                continue
            if m.subject is not None and m.subject != principal.subject:
                continue
            if m.scope is not None and m.scope not in principal.scopes:
                continue
            return rule
        return None

    def _denial(self, model: ModelSettings, requested: str, principal: Principal | None, rule: RouteRule | None) -> str | None:
        """Why the principal may not use the model, or None when it may."""
        names = {model.name, requested, *model.aliases}  # a grant of any of a model's names grants the model
        if principal is not None and not any(principal.may_use(n) for n in names):
            return "its token's scopes do not include this model"
        if rule is not None and rule.models is not None and not (names & set(rule.models)):
            return "a [[routes]] rule restricts it to other models"
        if rule is not None and rule.deployments is not None and not _pinned(model.deployments, rule):
            return "a [[routes]] rule pins it to backends that do not serve this model"
        return None

    def why_denied(self, model_name: str, principal: Principal | None) -> str | None:
        """Why the principal may not use this model (for operators), or None when it may."""
        return self._denial(self.resolve(model_name), model_name, principal, self.rule_for(principal))

    def visible_models(self, principal: Principal | None) -> list[ModelSettings]:
        """Models this principal may use, in config order (for GET /v1/models)."""
        rule = self.rule_for(principal)
        return [m for m in self.settings.models if self._denial(m, m.name, principal, rule) is None]

    # ------------------------------------------------------------------ planning
    def plan(self, model_name: str, principal: Principal | None = None) -> list[Attempt]:
        """Ordered attempts for one request: the model's own deployments, then its fallbacks."""
        model = self.resolve(model_name)
        rule = self.rule_for(principal)
        denial = self._denial(model, model_name, principal, rule)
        if denial is not None:
            raise ModelForbiddenError(f"You are not allowed to use the model '{model_name}'.", model_name)
        attempts = self._plan_model(model, rule, is_fallback=False)
        seen = {model.name}
        for fb_name in model.fallbacks:
            fb = self._by_name.get(fb_name)
            if fb is None or fb.name in seen:
                continue
            seen.add(fb.name)
            if self._denial(fb, fb_name, principal, rule) is None:
                attempts.extend(self._plan_model(fb, rule, is_fallback=True))
        return attempts

    def _plan_model(self, model: ModelSettings, rule: RouteRule | None, *, is_fallback: bool) -> list[Attempt]:
        deps = list(_pinned(model.deployments, rule)) if rule is not None and rule.deployments is not None else list(model.deployments)
        now = self._clock()
        healthy, sick = [], []
        for d, why in self._order(model, deps):
            if self._is_healthy(d.backend, now):
                healthy.append((d, why))
            else:
                sick.append((d, why + "; " + self._sickness(d.backend, now)))
        chosen = (healthy + sick)[: 1 + model.retries]
        pin = " (pinned by [[routes]])" if rule is not None and rule.deployments is not None else ""
        prefix = f"fallback model {model.name!r}: " if is_fallback else ""
        return [Attempt(model=model, backend=d.backend, is_fallback=is_fallback, reason=prefix + why + pin) for d, why in chosen]

    def _order(self, model: ModelSettings, deps: list[DeploymentRef]) -> list[tuple[DeploymentRef, str]]:
        """Deployments in strategy order, each with a human-readable reason."""
        if model.strategy == "least_busy":
            shuffled = self._rng.sample(deps, len(deps))  # random tie-break, then a stable sort
            ranked = sorted(shuffled, key=lambda d: self._states[d.backend].in_flight)
            return [(d, f"least_busy: {self._states[d.backend].in_flight} in flight") for d in ranked]
        if model.strategy == "latency":
            shuffled = self._rng.sample(deps, len(deps))
            ranked = sorted(shuffled, key=lambda d: _latency_key(self._states[d.backend].ewma_ttft_s))
            return [(d, _latency_reason(self._states[d.backend].ewma_ttft_s)) for d in ranked]
        if model.strategy == "priority":
            ranked = []
            for prio in sorted({d.priority for d in deps}):
                ranked += self._weighted([d for d in deps if d.priority == prio])
            return [(d, f"priority {d.priority}") for d in ranked]
        total = sum(d.weight for d in deps) or 1.0
        return [(d, f"weighted: weight {d.weight:g} ({d.weight / total:.0%} of first picks)") for d in self._weighted(deps)]

    def _weighted(self, deps: list[DeploymentRef]) -> list[DeploymentRef]:
        """Weighted random order without replacement: sort by u ** (1 / w) descending.
        Weight-0 deployments are standbys: after all others, in config order."""
        live = [d for d in deps if d.weight > 0]
        keyed = sorted(live, key=lambda d: math.log(self._rng.random() or 1e-300) / d.weight, reverse=True)
        return keyed + [d for d in deps if d.weight <= 0]

    # ------------------------------------------------------------------ health
    def _is_healthy(self, backend: str, now: float) -> bool:
        st = self._states[backend]
        if st.cooling_until is not None and now < st.cooling_until:
            return False
        return self._backend_ready(backend)

    def _backend_ready(self, backend: str) -> bool:
        if self._backends is None or backend not in self._backends:
            return True
        try:
            return bool(self._backends[backend].info().ready)
        except Exception:  # a broken info() must not break routing; treat as not ready
            return False

    def _sickness(self, backend: str, now: float) -> str:
        st = self._states[backend]
        if st.cooling_until is not None and now < st.cooling_until:
            return f"in cooldown for {st.cooling_until - now:.1f}s more, tried last"
        return "backend not ready, tried last"

    # ------------------------------------------------------------------ live state
    def begin(self, backend: str) -> None:
        """An attempt on `backend` starts (counts toward least_busy)."""
        st = self._states.setdefault(backend, DeploymentState())
        st.in_flight += 1
        st.num_requests += 1

    def end(self, backend: str, ok: bool, ttft_s: float | None = None, retriable_failure: bool = False) -> None:
        """An attempt ends. `ok`: it produced output. `retriable_failure`: the deployment failed (connection,
        timeout, 429/5xx) - counts toward cooldown. A request-caused error or a client disconnect is neither."""
        st = self._states.setdefault(backend, DeploymentState())
        st.in_flight = max(0, st.in_flight - 1)
        if ttft_s is not None and ttft_s >= 0:
            st.ewma_ttft_s = ttft_s if st.ewma_ttft_s is None else EWMA_ALPHA * ttft_s + (1 - EWMA_ALPHA) * st.ewma_ttft_s
        if ok:
            st.fail_times.clear()
            st.cooling_until = None
        elif retriable_failure:
            self._record_failure(backend, st)

    def _record_failure(self, backend: str, st: DeploymentState) -> None:
        now = self._clock()
        policy = self._cooldown.get(backend, _CooldownPolicy(allowed_fails=3, cooldown_s=30.0))
        st.num_failures += 1
        st.fail_times.append(now)
        while st.fail_times and st.fail_times[0] <= now - policy.cooldown_s:
            st.fail_times.popleft()
        if len(st.fail_times) >= policy.allowed_fails and policy.cooldown_s > 0:
            st.cooling_until = now + policy.cooldown_s
            st.fail_times.clear()

    def is_cooling(self, backend: str) -> bool:
        st = self._states.get(backend)
        return st is not None and st.cooling_until is not None and self._clock() < st.cooling_until

    def state(self) -> dict[str, dict[str, Any]]:
        """Per backend: in_flight, ewma_ttft_s, fails (recent), cooling, cooling_until (clock time) and
        cooldown_remaining_s; for /ready detail and metrics."""
        now = self._clock()
        out: dict[str, dict[str, Any]] = {}
        for name, st in self._states.items():
            cooling = st.cooling_until is not None and now < st.cooling_until
            out[name] = {
                "in_flight": st.in_flight,
                "ewma_ttft_s": st.ewma_ttft_s,
                "fails": len(st.fail_times),
                "cooling": cooling,
                "cooling_until": st.cooling_until if cooling else None,
                "cooldown_remaining_s": round(st.cooling_until - now, 3) if cooling and st.cooling_until else 0.0,
                "num_requests": st.num_requests,
                "num_failures": st.num_failures,
            }
        return out


def _pinned(deployments: Iterable[DeploymentRef], rule: RouteRule) -> list[DeploymentRef]:
    allowed = set(rule.deployments or ())
    return [d for d in deployments if d.backend in allowed]


def _latency_key(ewma: float | None) -> tuple[int, float]:
    return (0, 0.0) if ewma is None else (1, ewma)


def _latency_reason(ewma: float | None) -> str:
    return "latency: not measured yet, explored first" if ewma is None else f"latency: EWMA TTFT {ewma * 1000:.0f} ms"


def _cooldown_policies(models: Iterable[ModelSettings]) -> dict[str, _CooldownPolicy]:
    """Per backend, the strictest cooldown among the models it serves."""
    out: dict[str, _CooldownPolicy] = {}
    for model in models:
        for dep in model.deployments:
            old = out.get(dep.backend)
            if old is None:
                out[dep.backend] = _CooldownPolicy(model.allowed_fails, model.cooldown_s)
            else:
                out[dep.backend] = _CooldownPolicy(min(old.allowed_fails, model.allowed_fails), max(old.cooldown_s, model.cooldown_s))
    return out
