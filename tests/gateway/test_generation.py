"""Stream merging under deadlines, and usage totals, without a server."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest

from backends.base import BackendTimeout, Chunk, GenerationRequest, Message, Usage
from gateway.context import Call
from gateway.generation import Choice, Opened, merge, totals
from policies.routing import Attempt
from gateway.settings import ModelSettings, DeploymentRef

ATTEMPT = Attempt(model=ModelSettings(name="m", deployments=[DeploymentRef(backend="f")]), backend="f")


async def paced(n: int, every_s: float) -> AsyncIterator[Chunk]:
    for i in range(n):
        await asyncio.sleep(every_s)
        yield Chunk(text=f"t{i} ")
    yield Chunk(finish_reason="length", usage=Usage(prompt_tokens=3, completion_tokens=n))


def opened(*iters: AsyncIterator[Chunk]) -> Opened:
    return Opened(attempt=ATTEMPT, firsts=[Chunk(text="") for _ in iters], iters=list(iters))


async def test_a_slow_client_never_trips_the_idle_deadline():
    """The idle clock runs only while waiting on the backend, not while the client reads slowly."""
    loop = asyncio.get_running_loop()
    got = []
    async for _i, chunk in merge(opened(paced(4, 0.05)), loop.time() + 30, idle_s=0.2):
        got.append(chunk)
        await asyncio.sleep(0.3)  # the client applies backpressure for longer than idle_s
    assert got[-1].finish_reason == "length"


async def test_a_silent_backend_times_out_after_idle_s():
    async def silent() -> AsyncIterator[Chunk]:
        await asyncio.Event().wait()
        yield Chunk()

    loop = asyncio.get_running_loop()
    t0 = time.monotonic()
    with pytest.raises(BackendTimeout):
        async for _ in merge(opened(silent()), loop.time() + 30, idle_s=0.2):
            pass
    assert 0.15 < time.monotonic() - t0 < 2


async def test_the_total_deadline_cuts_a_steady_stream():
    loop = asyncio.get_running_loop()
    with pytest.raises(BackendTimeout):
        async for _ in merge(opened(paced(100, 0.05)), loop.time() + 0.3, idle_s=10):
            pass


async def test_an_outside_cancel_stays_a_cancel():
    loop = asyncio.get_running_loop()

    async def consume() -> None:
        async for _ in merge(opened(paced(100, 0.05)), loop.time() + 30, idle_s=10):
            pass

    task = asyncio.ensure_future(consume())
    await asyncio.sleep(0.12)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


def test_unfinished_choices_still_count_their_prompt():
    messages = [Message(role="user", content="x" * 400)]
    subs = [GenerationRequest(request_id=f"r/{i}", model="m", messages=messages) for i in range(2)]
    call = Call(request_id="r", endpoint="chat.completions", ts=0, t0=0)
    choices = [Choice(0), Choice(1)]
    choices[0].take(Chunk(text="a"))
    choices[1].take(Chunk(text="b"))
    totals(call, choices, subs)  # e.g. the client hung up before any usage arrived
    assert call.prompt_tokens >= 100 and call.completion_tokens == 2
    choices[0].take(Chunk(finish_reason="stop", usage=Usage(prompt_tokens=7, completion_tokens=1)))
    totals(call, choices, subs)  # one finished choice gives the exact count, once
    assert call.prompt_tokens == 7 and call.completion_tokens == 2
