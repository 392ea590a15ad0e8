"""Fixtures for the torch engine tests: a tiny random Gemma 3, its tokenizer, one torch thread."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.backends.torch_engine.tiny import tiny_gemma3, tiny_tokenizer


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread() -> Iterator[None]:
    # On 2 shared cores an OpenMP barrier can wait a whole scheduler slice per op; tiny models
    # run faster and steadier on one thread.
    try:
        import torch
    except ImportError:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_model() -> Any:
    return tiny_gemma3()


@pytest.fixture(scope="session")
def tokenizer() -> Any:
    return tiny_tokenizer()
