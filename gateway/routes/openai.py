"""The OpenAI endpoints: thin adapters from Litestar to the pipeline."""

from __future__ import annotations

import time
from typing import Any

from litestar import Request, Response, get, post
from litestar.datastructures import State
from litestar.params import FromPath
from litestar.types import ASGIApp

from gateway import pipeline
from gateway.errors import ModelNotFound, Unauthorized
from gateway.openapi import ChatCompletionOperation, CompletionOperation
from gateway.schemas import encoder
from policies import auth as auth_policy
from policies import routing
from policies.auth import ANONYMOUS, Principal

_STARTED = int(time.time())


def services_of(state: State) -> pipeline.Services:
    return state.services  # type: ignore[no-any-return]


@post("/v1/chat/completions", status_code=200, summary="Create a chat completion", operation_class=ChatCompletionOperation)
async def chat_completions(request: Request[Any, Any, Any]) -> ASGIApp:
    return await pipeline.handle(services_of(request.app.state), request, "chat.completions")


@post("/v1/completions", status_code=200, summary="Create a text completion", operation_class=CompletionOperation)
async def completions(request: Request[Any, Any, Any]) -> ASGIApp:
    return await pipeline.handle(services_of(request.app.state), request, "completions")


async def _principal(services: pipeline.Services, request: Request[Any, Any, Any]) -> Principal:
    if services.authenticator is None:
        return ANONYMOUS
    try:
        return await services.authenticator.authenticate_async(request.headers.get("authorization"))
    except auth_policy.AuthError as exc:
        raise Unauthorized(exc.message) from None


def _model_card(services: pipeline.Services, model: Any) -> dict[str, Any]:
    backends = [services.backends[d.backend] for d in model.deployments if d.backend in services.backends]
    infos = [b.info() for b in backends]
    context = model.context_length or min((i.context_length for i in infos), default=None)
    return {
        "id": model.name,
        "object": "model",
        "created": _STARTED,
        "owned_by": "aibox",
        "aliases": list(model.aliases),
        "context_length": context,
        "ready": any(i.ready for i in infos),
    }


@get("/v1/models", summary="List the models this caller may use")
async def list_models(request: Request[Any, Any, Any], state: State) -> Response[Any]:
    services = services_of(state)
    principal = await _principal(services, request)
    data = [_model_card(services, m) for m in services.router.visible_models(principal)]
    return Response(content=encoder.encode({"object": "list", "data": data}), media_type="application/json")


@get("/v1/models/{model_id:path}", summary="Retrieve a model")
async def get_model(model_id: FromPath[str], request: Request[Any, Any, Any], state: State) -> Response[Any]:
    services = services_of(state)
    principal = await _principal(services, request)
    model_id = model_id.lstrip("/")
    try:
        model = services.router.resolve(model_id)
    except routing.ModelNotFoundError:
        raise ModelNotFound(model_id) from None
    if model not in services.router.visible_models(principal):
        raise ModelNotFound(model_id)
    return Response(content=encoder.encode(_model_card(services, model)), media_type="application/json")
