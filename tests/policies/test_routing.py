"""Router: strategies, cooldown with an injected clock, fallbacks, tenant rules, scopes."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from backends.base import BackendInfo
from gateway.settings import ConfigError, parse
from policies.auth import Principal
from policies.routing import ModelForbiddenError, ModelNotFoundError, Router


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make_settings(models: list[dict], routes: list[dict] | None = None, backends: tuple[str, ...] = ("a", "b", "c", "gpu")):
    return parse(
        {
            "backends": {name: {"type": "fake"} for name in backends},
            "models": models,
            "routes": routes or [],
        }
    )


def router_for(models: list[dict], routes: list[dict] | None = None, seed: int = 7, **kw) -> tuple[Router, Clock]:
    clock = Clock()
    return Router(make_settings(models, routes), clock=clock, rng=random.Random(seed), **kw), clock


def deps(*names: str, **weights: float) -> list[dict]:
    return [{"backend": n, "weight": weights.get(n, 1.0)} for n in names]


def test_weighted_first_pick_shares_over_400_requests() -> None:
    router, _ = router_for([{"name": "m", "deployments": deps("a", "b", a=3.0, b=1.0)}])
    firsts = Counter(router.plan("m")[0].backend for _ in range(400))
    assert 0.75 * 400 - 40 <= firsts["a"] <= 0.75 * 400 + 40  # 3:1 within 10 points
    assert firsts["a"] + firsts["b"] == 400


def test_weighted_order_is_without_replacement_and_zero_weight_is_standby() -> None:
    router, _ = router_for([{"name": "m", "retries": 5, "deployments": deps("a", "b", "c", c=0.0)}])
    for _ in range(50):
        order = [a.backend for a in router.plan("m")]
        assert sorted(order) == ["a", "b", "c"] and order[-1] == "c"


def test_retries_limit_the_number_of_deployments() -> None:
    router, _ = router_for([{"name": "m", "retries": 1, "deployments": deps("a", "b", "c")}])
    assert len(router.plan("m")) == 2
    router, _ = router_for([{"name": "m", "retries": 0, "deployments": deps("a", "b", "c")}])
    assert len(router.plan("m")) == 1


def test_least_busy_prefers_the_idle_deployment() -> None:
    router, _ = router_for([{"name": "m", "strategy": "least_busy", "deployments": deps("a", "b")}])
    router.begin("a")
    assert all(router.plan("m")[0].backend == "b" for _ in range(20))
    router.begin("b")
    router.begin("b")
    assert router.plan("m")[0].backend == "a"
    router.end("b", ok=True)
    router.end("b", ok=True)
    router.end("a", ok=True)
    assert Counter(router.plan("m")[0].backend for _ in range(100)).keys() == {"a", "b"}  # ties spread


def test_latency_explores_unknown_first_then_prefers_fastest() -> None:
    router, _ = router_for([{"name": "m", "strategy": "latency", "deployments": deps("a", "b", "c")}])
    router.end("a", ok=True, ttft_s=0.5)
    router.end("b", ok=True, ttft_s=0.1)
    assert [a.backend for a in router.plan("m")] == ["c", "b", "a"]
    router.end("c", ok=True, ttft_s=0.3)
    assert [a.backend for a in router.plan("m")] == ["b", "c", "a"]
    for _ in range(10):  # EWMA follows a deployment that got slow
        router.end("b", ok=True, ttft_s=2.0)
    assert [a.backend for a in router.plan("m")][-1] == "b"


def test_priority_picks_lowest_healthy_value() -> None:
    router, clock = router_for(
        [
            {
                "name": "m",
                "strategy": "priority",
                "allowed_fails": 1,
                "deployments": [{"backend": "a", "priority": 1}, {"backend": "b", "priority": 0}, {"backend": "c", "priority": 2}],
            }
        ]
    )
    assert [a.backend for a in router.plan("m")] == ["b", "a", "c"]
    router.end("b", ok=False, retriable_failure=True)
    plan = router.plan("m")
    assert [a.backend for a in plan] == ["a", "c", "b"]
    assert "cooldown" in plan[-1].reason


def test_cooldown_after_allowed_fails_and_recovery_with_injected_clock() -> None:
    router, clock = router_for(
        [{"name": "m", "strategy": "priority", "allowed_fails": 2, "cooldown_s": 10, "deployments": [{"backend": "a"}, {"backend": "b", "priority": 1}]}]
    )
    router.end("a", ok=False, retriable_failure=True)
    assert router.plan("m")[0].backend == "a"  # one failure is tolerated
    clock.now += 11  # an old failure falls out of the window
    router.end("a", ok=False, retriable_failure=True)
    assert router.plan("m")[0].backend == "a"
    router.end("a", ok=False, retriable_failure=True)
    assert [a.backend for a in router.plan("m")] == ["b", "a"]  # cooled down: still tried, but last
    st = router.state()["a"]
    assert st["cooling"] and st["cooldown_remaining_s"] == pytest.approx(10.0)
    clock.now += 9.9
    assert router.plan("m")[0].backend == "b"
    clock.now += 0.2
    assert router.plan("m")[0].backend == "a" and not router.state()["a"]["cooling"]


def test_request_caused_errors_do_not_cool_down_and_success_clears() -> None:
    router, _ = router_for([{"name": "m", "allowed_fails": 1, "deployments": deps("a")}])
    router.end("a", ok=False, retriable_failure=False)
    assert not router.is_cooling("a")
    router.end("a", ok=False, retriable_failure=True)
    assert router.is_cooling("a")
    router.end("a", ok=True, ttft_s=0.01)  # it was tried while cooling (nothing else) and worked
    assert not router.is_cooling("a") and router.state()["a"]["fails"] == 0


def test_fallbacks_are_appended_in_order_and_marked() -> None:
    router, _ = router_for(
        [
            {"name": "big", "retries": 0, "fallbacks": ["mid", "small"], "deployments": deps("a")},
            {"name": "mid", "deployments": deps("b")},
            {"name": "small", "aliases": ["tiny"], "deployments": deps("c")},
        ]
    )
    plan = router.plan("big")
    assert [(a.model.name, a.backend, a.is_fallback) for a in plan] == [("big", "a", False), ("mid", "b", True), ("small", "c", True)]
    assert [a.backend for a in router.plan("tiny")] == ["c"]  # alias; fallbacks of the target only


def test_unknown_model_and_bad_config() -> None:
    router, _ = router_for([{"name": "m", "deployments": deps("a")}])
    with pytest.raises(ModelNotFoundError):
        router.plan("nope")
    with pytest.raises(ConfigError, match="unknown backend"):
        make_settings([{"name": "m", "deployments": deps("zzz")}])


ACME = Principal(subject="alice", tenant="acme")
OTHER = Principal(subject="bob", tenant="globex")


@pytest.mark.parametrize(
    ("principal", "expected"),
    [(ACME, ["gpu"]), (OTHER, ["a", "gpu"]), (Principal(subject="ci", scopes=frozenset({"batch", "*"})), ["a"])],
)
def test_tenant_rules_pin_deployments(principal: Principal, expected: list[str]) -> None:
    routes = [
        {"match": {"tenant": "acme"}, "deployments": ["gpu"]},
        {"match": {"scope": "batch"}, "deployments": ["a"]},
    ]
    router, _ = router_for([{"name": "m", "deployments": deps("a", "gpu")}], routes)
    for _ in range(10):
        assert sorted(a.backend for a in router.plan("m", principal)) == expected


def test_tenant_rules_restrict_models_and_hide_them() -> None:
    routes = [{"match": {"tenant": "acme"}, "models": ["small"]}, {"match": {"subject": "bob"}, "deployments": ["gpu"]}]
    router, _ = router_for(
        [{"name": "big", "deployments": deps("gpu"), "fallbacks": ["small"]}, {"name": "small", "deployments": deps("a")}], routes
    )
    with pytest.raises(ModelForbiddenError):
        router.plan("big", ACME)
    assert [m.name for m in router.visible_models(ACME)] == ["small"]
    assert [m.name for m in router.visible_models(OTHER)] == ["big"]  # small has no gpu deployment
    assert [a.backend for a in router.plan("big", OTHER)] == ["gpu"]  # its fallback is not servable
    with pytest.raises(ModelForbiddenError):
        router.plan("small", OTHER)


def test_scopes_restrict_models() -> None:
    router, _ = router_for([{"name": "m", "deployments": deps("a")}, {"name": "n", "deployments": deps("b")}])
    scoped = Principal(subject="s", scopes=frozenset({"model:n"}))
    with pytest.raises(ModelForbiddenError):
        router.plan("m", scoped)
    assert [m.name for m in router.visible_models(scoped)] == ["n"]


class NotReady:
    def info(self) -> BackendInfo:
        return BackendInfo(name="a", type="fake", model_id="x", context_length=1, ready=False)


def test_not_ready_backends_are_tried_last() -> None:
    settings = make_settings([{"name": "m", "strategy": "priority", "deployments": deps("a", "b")}])
    router = Router(settings, {"a": NotReady()}, rng=random.Random(1))
    assert [a.backend for a in router.plan("m")] == ["b", "a"]


def test_reconfigure_keeps_live_state_of_kept_backends() -> None:
    router, clock = router_for([{"name": "m", "allowed_fails": 1, "deployments": deps("a", "b")}])
    router.begin("a")
    router.end("b", ok=False, retriable_failure=True)
    new = router.reconfigure(make_settings([{"name": "m2", "deployments": deps("a", "b")}]), keep=["a"])
    assert new.state()["a"]["in_flight"] == 1
    assert not new.state()["b"]["cooling"]  # b was replaced: fresh state
    router.end("a", ok=True)  # an in-flight request finishing on the old router is seen by the new one
    assert new.state()["a"]["in_flight"] == 0


def test_a_scope_or_rule_naming_an_alias_grants_the_model() -> None:
    router, _ = router_for([{"name": "gemma-3", "aliases": ["gemma"], "deployments": deps("a")}, {"name": "n", "deployments": deps("b")}])
    scoped = Principal(subject="s", scopes=frozenset({"model:gemma"}))
    assert [m.name for m in router.visible_models(scoped)] == ["gemma-3"]
    assert [a.backend for a in router.plan("gemma-3", scoped)] == ["a"]
