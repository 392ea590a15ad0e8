"""The OpenAI surface, driven by the official SDK against a real server (fake backend)."""

from __future__ import annotations

import httpx
import msgspec
import openai
import pytest

from tests.live import serve, settings_from

SCRIPT = "alpha beta gamma delta epsilon zeta eta theta iota kappa. "


def fake_settings(**server: object) -> dict:
    return {
        "server": {"max_body_bytes": 4096, "max_n": 4, **server},
        "auth": {"enabled": False},
        "ratelimit": {"enabled": False},
        "audit": {"enabled": False},
        "backends": {"f": {"type": "fake", "script": SCRIPT, "context_length": 64}},
        "models": [{"name": "m", "aliases": ["m-alias"], "deployments": [{"backend": "f"}]}],
    }


@pytest.fixture(scope="module")
def server():
    with serve(settings_from(fake_settings())) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0) as c:
        yield c


def chat(client, **kw):
    kw.setdefault("model", "m")
    kw.setdefault("messages", [{"role": "user", "content": "hi"}])
    return client.chat.completions.create(**kw)


def test_models_list_and_retrieve(client):
    models = client.models.list()
    assert [m.id for m in models.data] == ["m"]
    assert client.models.retrieve("m").id == "m"
    assert client.models.retrieve("m-alias").id == "m"
    with pytest.raises(openai.NotFoundError) as exc:
        client.models.retrieve("nope")
    assert exc.value.code == "model_not_found"


def test_chat_non_stream(client):
    r = chat(client, max_tokens=3)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-") and r.model == "m"
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == "alpha beta gamma"
    assert r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (3, 3, 6)


def test_alias_resolves(client):
    assert chat(client, model="m-alias", max_tokens=1).choices[0].message.content == "alpha"


def test_stream_equals_non_stream_and_usage(client):
    full = chat(client, max_tokens=8, temperature=0)
    chunks = list(chat(client, max_tokens=8, temperature=0, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8
    assert all(c.usage is None for c in chunks[:-1])


def test_stream_without_include_usage_has_no_usage_chunk(client):
    chunks = list(chat(client, max_tokens=2, stream=True))
    assert all(c.choices for c in chunks)


def test_stop_is_not_returned(client):
    r = chat(client, stop=[" gamma"], max_tokens=10)
    assert r.choices[0].message.content == "alpha beta"
    assert r.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].delta.content or "" for c in chat(client, stop="gam", max_tokens=10, stream=True))
    assert streamed == "alpha beta "


def test_max_completion_tokens_wins(client):
    r = chat(client, max_tokens=9, max_completion_tokens=2)
    assert r.usage.completion_tokens == 2


def test_n_choices_stream_and_not(client):
    r = chat(client, n=3, max_tokens=2)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert r.usage.prompt_tokens == 3 and r.usage.completion_tokens == 6
    chunks = list(chat(client, n=2, max_tokens=2, stream=True))
    by_index: dict[int, str] = {}
    for c in chunks:
        for ch in c.choices:
            by_index[ch.index] = by_index.get(ch.index, "") + (ch.delta.content or "")
    assert by_index == {0: "alpha beta", 1: "alpha beta"}


def test_content_parts_and_unknown_fields(client):
    r = client.chat.completions.create(
        model="m",
        messages=[{"role": "system", "content": "be brief"}, {"role": "user", "content": [{"type": "text", "text": "[[echo]] one two"}]}],
        extra_body={"some_future_field": {"x": 1}},
    )
    assert r.choices[0].message.content == " one two"


def test_completions_prompt_list_and_echo(client):
    r = client.completions.create(model="m", prompt=["a", "b c"], max_tokens=2)
    assert r.object == "text_completion" and len(r.choices) == 2
    assert r.choices[1].text == "alpha beta" and r.usage.prompt_tokens == 3
    echo = client.completions.create(model="m", prompt="say", max_tokens=1, echo=True)
    assert echo.choices[0].text == "sayalpha"
    streamed = list(client.completions.create(model="m", prompt="x", max_tokens=3, stream=True))
    assert "".join(c.choices[0].text for c in streamed if c.choices) == "alpha beta gamma"


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"n": 9}, "n"),
        ({"n": 0}, "n"),
        ({"temperature": 3}, "temperature"),
        ({"top_p": -1}, "top_p"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, "messages[0].content[0].type"),
        ({"stop": [""]}, "stop"),
        ({"logprobs": True}, "logprobs"),
        ({"model": ""}, "model"),
    ],
)
def test_bad_fields_are_400_with_param(client, kwargs, param):
    with pytest.raises(openai.BadRequestError) as exc:
        chat(client, **kwargs)
    assert exc.value.body["param"] == param
    assert exc.value.body["type"] == "invalid_request_error"


def test_context_length_exceeded(client):
    with pytest.raises(openai.BadRequestError) as exc:
        chat(client, max_tokens=500)
    assert exc.value.code == "context_length_exceeded"


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as exc:
        chat(client, model="gpt-9")
    assert exc.value.code == "model_not_found" and exc.value.body["param"] == "model"


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "code"),
    [
        ("POST", "/v1/chat/completions", b"{not json", 400, None),
        ("POST", "/v1/chat/completions", b"", 400, None),
        ("POST", "/v1/chat/completions", b"[]", 400, None),
        ("POST", "/v1/chat/completions", b'{"model":"m"}', 400, None),
        ("POST", "/v1/chat/completions", b'{"model":"m","messages":"' + b"x" * 5000 + b'"}', 413, "body_too_large"),
        ("GET", "/v1/nothing-here", None, 404, "not_found"),
        ("GET", "/v1/chat/completions", None, 405, "method_not_allowed"),
    ],
)
def test_error_shape(server, method, path, body, status, code):
    r = httpx.request(method, server.url + path, content=body, headers={"content-type": "application/json"})
    assert r.status_code == status
    err = msgspec.json.decode(r.content)["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["code"] == code and isinstance(err["message"], str) and "Traceback" not in err["message"]


def test_backend_failure_is_500_without_details(client):
    with pytest.raises(openai.InternalServerError) as exc:
        chat(client, messages=[{"role": "user", "content": "[[fail]]"}])
    assert exc.value.body["type"] == "server_error"


def test_mid_stream_failure_sends_error_event_then_done(server):
    body = {"model": "m", "messages": [{"role": "user", "content": "[[fail-after:2]]"}], "stream": True, "max_tokens": 10}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        events = [line.removeprefix("data: ") for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    assert msgspec.json.decode(events[-2])["error"]["type"] == "server_error"


def test_request_id_header_echoed(server):
    r = httpx.post(server.url + "/v1/chat/completions", json={"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": 1}, headers={"x-request-id": "abc-123"})
    assert r.headers["x-request-id"] == "abc-123"
    assert float(r.headers["x-aibox-overhead-ms"]) >= 0


@pytest.mark.parametrize(
    ("body", "content_type"),
    [
        ({"max_tokens": 2}, "application/json"),
        ({"max_tokens": 2, "stream": True}, "text/event-stream; charset=utf-8"),
        ({"max_tokens": -1}, "application/json"),  # an error
        ({"max_tokens": -1, "stream": True}, "application/json"),  # an error before the stream starts
    ],
)
def test_response_headers(server, body, content_type):
    r = httpx.post(server.url + "/v1/chat/completions", json={"model": "m", "messages": [{"role": "user", "content": "x"}], **body})
    assert r.headers["content-type"] == content_type
    assert r.headers["x-request-id"].startswith("chatcmpl-")
    if content_type == "application/json":
        assert int(r.headers["content-length"]) == len(r.content) and r.json()
    else:
        assert r.headers["cache-control"] == "no-cache" and r.text.endswith("data: [DONE]\n\n")


def test_health_and_ready(server):
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    ready = httpx.get(server.url + "/ready").json()
    assert ready["status"] == "ready" and ready["backends"]["f"]["ready"] is True


def test_a_backend_bug_mid_stream_is_a_clean_500_and_frees_the_deployment(server, client):
    with pytest.raises(openai.InternalServerError):
        chat(client, messages=[{"role": "user", "content": "[[bug-after:1]]"}], max_tokens=5)
    body = {"model": "m", "messages": [{"role": "user", "content": "[[bug-after:1]]"}], "stream": True, "max_tokens": 5}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body) as r:
        events = [line.removeprefix("data: ") for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    assert msgspec.json.decode(events[-2])["error"]["type"] == "server_error"
    ready = httpx.get(server.url + "/ready").json()
    assert ready["routing"]["f"]["in_flight"] == 0 and ready["backends"]["f"]["in_flight"] == 0
