"""Shared pieces of the ops suites: a fake-backend config and SSE parsing."""

from __future__ import annotations

import copy
from typing import Any

import msgspec

SCRIPT = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau upsilon. "


def config(**sections: Any) -> dict[str, Any]:
    """A TOML-shaped config: auth/ratelimit/audit off, one fake backend `f` serving model `m`.
    Keyword arguments replace (server: merge) whole sections."""
    doc: dict[str, Any] = {
        "server": {},
        "auth": {"enabled": False},
        "ratelimit": {"enabled": False},
        "audit": {"enabled": False},
        "backends": {"f": {"type": "fake", "script": SCRIPT}},
        "models": [{"name": "m", "deployments": [{"backend": "f"}]}],
    }
    for key, value in sections.items():
        if key == "server":
            doc["server"].update(value)
        elif key == "fake":
            doc["backends"]["f"].update(value)
        else:
            doc[key] = copy.deepcopy(value)
    return doc


def chat(content: str = "hello", **kw: Any) -> dict[str, Any]:
    return {"model": "m", "messages": [{"role": "user", "content": content}], **kw}


def sse_events(body: str) -> list[Any]:
    """Every `data:` payload in order (JSON decoded; the literal "[DONE]" kept as a string).
    Comment lines (": keep-alive") are not events and are dropped."""
    out: list[Any] = []
    for block in body.split("\n\n"):
        for line in block.split("\n"):
            if line.startswith("data: "):
                data = line[len("data: ") :]
                out.append(data if data == "[DONE]" else msgspec.json.decode(data))
    return out


def is_openai_error(body: Any) -> bool:
    """OpenAI's error shape: {"error": {"message": str, "type": str, "param": ..., "code": ...}}."""
    err = body.get("error") if isinstance(body, dict) else None
    return (
        isinstance(err, dict)
        and isinstance(err.get("message"), str)
        and bool(err["message"])
        and isinstance(err.get("type"), str)
        and "param" in err
        and "code" in err
    )
