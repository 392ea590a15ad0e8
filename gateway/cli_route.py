"""`aibox route explain`: which deployments a request would try, in which order, and why.

    aibox route explain --config config.toml --model NAME [--token JWT | --tenant T --subject S --scopes a,b]

Offline: it reads the config, not a running gateway, so no deployment is in cooldown and nothing is
in flight. Weighted order is random per request; the most likely order is shown (highest weight
first) with each deployment's share of first picks.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
from collections.abc import MutableSequence, Sequence
from typing import Any

from gateway.settings import ConfigError, Settings, load


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("route", help="inspect routing decisions")
    route_sub = p.add_subparsers(dest="route_command", required=True, metavar="COMMAND")
    e = route_sub.add_parser("explain", help="print the deployments a request would try, in order, and why")
    e.add_argument("--config", default="config.toml", help="path to config.toml (default: %(default)s)")
    e.add_argument("--model", required=True, help="public model name or alias the client would send")
    who = e.add_mutually_exclusive_group()
    who.add_argument("--token", help="a JWT: route as the principal it authenticates to")
    who.add_argument("--tenant", help="route as a principal of this tenant")
    e.add_argument("--subject", default=None, help="subject of the principal (default: anonymous)")
    e.add_argument("--scopes", default="", help="comma-separated scopes of the principal (default: none = all models)")
    e.set_defaults(func=explain)


class _MostLikely(random.Random):
    """An rng that makes the Router's random choices deterministic: weighted order becomes
    highest-weight-first, random tie-breaks keep config order."""

    def random(self) -> float:
        return 0.5

    def sample(self, population: Sequence[Any], k: int, **_: Any) -> list[Any]:  # type: ignore[override]
        return list(population)[:k]

    def shuffle(self, x: MutableSequence[Any]) -> None:  # type: ignore[override]
        return None


def _principal(args: argparse.Namespace, settings: Settings) -> Any:
    from policies.auth import Principal

    if args.token:
        from policies.auth import build_authenticator
        from policies.tokens import signing_secret

        secret = signing_secret(settings.auth, args.config)
        if secret and not os.environ.get(settings.auth.secret_env):
            os.environ[settings.auth.secret_env] = secret  # the dev secret, as `aibox serve` uses it
        return build_authenticator(settings).authenticate(f"Bearer {args.token}")
    scopes = frozenset(s.strip() for s in args.scopes.split(",") if s.strip())
    return Principal(subject=args.subject or "anonymous", tenant=args.tenant, scopes=scopes)


def explain_lines(settings: Settings, model_name: str, principal: Any) -> list[str]:
    """The report, as lines; raises policies.routing errors for unknown/forbidden models."""
    from policies.routing import Router

    router = Router(settings, rng=_MostLikely())
    model = router.resolve(model_name)
    lines = []
    alias = f" (alias of {model.name!r})" if model.name != model_name else ""
    lines.append(f"model {model_name!r}{alias}: strategy {model.strategy}, retries {model.retries}, fallbacks {model.fallbacks or 'none'}")
    scopes = ",".join(sorted(principal.scopes)) or "(none: all models)"
    lines.append(f"principal: subject={principal.subject} tenant={principal.tenant or '-'} scopes={scopes}")
    rule = router.rule_for(principal)
    if rule is None:
        lines.append("tenant rule: none matches")
    else:
        index = settings.routes.index(rule)
        match = " ".join(f"{k}={v}" for k, v in (("tenant", rule.match.tenant), ("subject", rule.match.subject), ("scope", rule.match.scope)) if v)
        what = [f"models {rule.models}" if rule.models is not None else "", f"pinned to backends {rule.deployments}" if rule.deployments is not None else ""]
        lines.append(f"tenant rule: routes[{index}] (match {match or 'everyone'}): {'; '.join(w for w in what if w) or 'no restriction'}")
    denied = router.why_denied(model_name, principal)
    if denied is not None:
        lines.append(f"DENIED (403): {denied}")
        return lines
    attempts = router.plan(model_name, principal)
    width = max([10, *(len(a.backend) for a in attempts)])
    lines.append("")
    lines.append(f"  #  {'deployment':<{width}}  {'model':<12} {'type':<9} why")
    for i, a in enumerate(attempts, 1):
        btype = type(settings.backends[a.backend]).__struct_config__.tag
        lines.append(f"  {i:<2} {a.backend:<{width}}  {a.model.name:<12} {btype!s:<9} {a.reason}")
    tried = {a.backend for a in attempts if not a.is_fallback}
    pinned = set(rule.deployments) if rule is not None and rule.deployments is not None else None
    excluded = [d.backend for d in model.deployments if pinned is not None and d.backend not in pinned]
    beyond = [d.backend for d in model.deployments if d.backend not in tried and d.backend not in excluded]
    if excluded:
        lines.append(f"  not tried: {', '.join(excluded)} (excluded by the tenant rule)")
    if beyond:
        lines.append(f"  not tried: {', '.join(beyond)} (beyond 1 + retries={model.retries} attempts)")
    fallbacks_tried = {a.model.name for a in attempts if a.is_fallback}
    for fb in model.fallbacks:
        fb_model = router.resolve(fb)
        if fb_model.name not in fallbacks_tried and fb_model.name != model.name:
            lines.append(f"  fallback {fb!r} skipped: {router.why_denied(fb, principal) or 'already listed'}")
    return lines


def explain(args: argparse.Namespace) -> int:
    from policies.auth import AuthError
    from policies.routing import RoutingError

    if args.token and (args.subject or args.scopes):
        print("aibox: --token already names the principal; drop --subject/--scopes", file=sys.stderr)
        return 1
    try:
        settings = load(args.config)
        principal = _principal(args, settings)
        lines = explain_lines(settings, args.model, principal)
    except ConfigError as exc:
        print(f"aibox: {exc}", file=sys.stderr)
        return 1
    except AuthError as exc:
        print(f"aibox: token rejected: {exc.message}", file=sys.stderr)
        return 1
    except RoutingError as exc:
        known = ", ".join(sorted({n for m in settings.models for n in (m.name, *m.aliases)})) or "none"
        print(f"aibox: {exc.message} (known models: {known})", file=sys.stderr)
        return 2
    print("\n".join(lines))
    return 2 if lines and lines[-1].startswith("DENIED") else 0
