"""The bundled Gemma 3 270M GGUF through the model store: the real forward against transformers."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import torch

from backends.base import SamplingParams
from backends.torch_engine.loader import engine_for_model
from backends.torch_engine.model_store import load_model, resolve_model_dir
from gateway.settings import TorchBackendConfig

pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def store_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One store per test session: the (slow) GGUF conversion happens once."""
    return tmp_path_factory.mktemp("model-store")


@pytest.fixture(scope="session")
def bundled(store_dir: Path) -> tuple[Any, Any, Path]:
    model_dir = resolve_model_dir("bundled:gemma3-270m", store_dir)
    model, tokenizer = load_model(model_dir, "float32")
    return model, tokenizer, model_dir


def test_store_reuses_the_conversion(bundled: tuple[Any, Any, Path], store_dir: Path) -> None:
    _, _, model_dir = bundled
    assert (model_dir / "model.safetensors").exists() and model_dir.parent == store_dir
    start = time.monotonic()
    assert resolve_model_dir("bundled:gemma3-270m", store_dir) == model_dir  # hash hit, no conversion
    assert time.monotonic() - start < 15


def test_batched_greedy_matches_transformers(bundled: tuple[Any, Any, Path]) -> None:
    model, tokenizer, _ = bundled
    assert model.config.layer_types.count("full_attention") >= 1 and model.config.sliding_window
    prompts = [tokenizer(t).input_ids for t in ("The capital of France is", "1, 2, 3, 4,", "Once upon a time")]
    cfg = TorchBackendConfig(max_num_seqs=4, max_model_len=256, num_kv_blocks=64)
    engine = engine_for_model(model, tokenizer, cfg, model_id="gemma").engine
    tokens: dict[int, list[int]] = {}
    for p in prompts:
        engine.add_request(
            p, max_tokens=6, sampling=SamplingParams(temperature=0.0),
            on_output=lambda o: tokens.setdefault(o.seq_id, []).extend(o.token_ids),
        )
    while engine.step():
        pass
    for i, p in enumerate(prompts):
        ref = model.generate(
            torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
            max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0,
        )[0, len(p) :].tolist()
        assert tokens[i] == ref, tokenizer.decode(p)
