"""Build a ready engine from config: resolve + load the model, size the KV pool, wire the parts."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from backends.bundled import GEMMA_TURN_STOPS
from backends.torch_engine.engine import Engine, RequestMetrics
from backends.torch_engine.kv_cache import cdiv
from backends.torch_engine.model_store import load_model, resolve_model_dir
from backends.torch_engine.models.gemma3 import Gemma3Model
from backends.torch_engine.runner import ModelRunner
from gateway.settings import TorchBackendConfig

log = logging.getLogger(__name__)

KV_BUDGET_BYTES = 2 << 30  # default pool cap when num_kv_blocks is unset


@dataclass
class LoadedEngine:
    engine: Engine
    tokenizer: Any
    max_model_len: int
    model_id: str
    stop_token_ids: frozenset[int]


def build_engine(
    config: TorchBackendConfig, on_request_finished: Callable[[RequestMetrics], None] | None = None
) -> LoadedEngine:
    """Load `config.model` (through the store for GGUF) and build its engine (not started)."""
    model_dir = resolve_model_dir(config.model, config.store_dir)
    hf_model, tokenizer = load_model(model_dir, "float32")
    ref = config.model
    model_id = ref.removeprefix("bundled:") if ref.startswith("bundled:") else Path(ref).stem
    return engine_for_model(hf_model, tokenizer, config, model_id=model_id, on_request_finished=on_request_finished)


def resolve_device(name: str) -> torch.device:
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} requested but CUDA is not available in this torch build")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"unsupported device {name!r} (use cpu, cuda or cuda:N)")
    return device


def stop_token_ids(hf_model: Any, tokenizer: Any) -> frozenset[int]:
    """EOS ids from the tokenizer and generation config, plus Gemma's end-of-turn token."""
    ids: set[int] = set()
    for source in (tokenizer.eos_token_id, getattr(hf_model.generation_config, "eos_token_id", None)):
        if isinstance(source, int):
            ids.add(source)
        elif source:
            ids.update(int(i) for i in source)
    vocab = tokenizer.get_vocab()
    ids.update(vocab[s] for s in GEMMA_TURN_STOPS if s in vocab)
    return frozenset(ids)


def engine_for_model(
    hf_model: Any,
    tokenizer: Any,
    config: TorchBackendConfig,
    *,
    model_id: str,
    on_request_finished: Callable[[RequestMetrics], None] | None = None,
) -> LoadedEngine:
    """Engine over an already loaded transformers Gemma3ForCausalLM (tests build tiny ones)."""
    device = resolve_device(config.device)
    if config.num_threads is not None:
        # Process-wide: on a shared CPU fewer threads avoid OpenMP barrier stalls between ops.
        torch.set_num_threads(config.num_threads)
    model = Gemma3Model(hf_model, device, getattr(torch, config.dtype))
    model_max = int(hf_model.config.max_position_embeddings)
    max_model_len = config.max_model_len or model_max
    if max_model_len > model_max:
        raise ValueError(f"max_model_len {max_model_len} exceeds the model's {model_max} positions")
    bytes_per_token = 2 * model.num_layers * model.num_kv_heads * model.head_dim * model.embed.element_size()
    num_blocks = config.num_kv_blocks
    if num_blocks is None:
        wanted = cdiv(config.max_num_seqs * max_model_len, config.block_size)
        cap = max(cdiv(max_model_len, config.block_size), KV_BUDGET_BYTES // (bytes_per_token * config.block_size))
        num_blocks = min(wanted, cap)
        if num_blocks < wanted:
            log.info("KV pool capped at %d blocks (%.1f GiB); busy periods preempt", num_blocks, cap * bytes_per_token * config.block_size / 2**30)
    if num_blocks * config.block_size < max_model_len:  # one request must fit the pool alone
        log.info("max_model_len lowered to the KV pool size, %d tokens", num_blocks * config.block_size)
        max_model_len = num_blocks * config.block_size
    engine = Engine(
        ModelRunner(model, num_blocks=num_blocks, block_size=config.block_size),
        lambda ids: tokenizer.decode(ids, skip_special_tokens=True),
        num_kv_blocks=num_blocks,
        block_size=config.block_size,
        max_num_seqs=config.max_num_seqs,
        max_num_batched_tokens=config.max_num_batched_tokens,
        queue_size=config.queue_size,
        num_speculative_tokens=config.num_speculative_tokens,
        on_request_finished=on_request_finished,
    )
    return LoadedEngine(engine, tokenizer, max_model_len, model_id, stop_token_ids(hf_model, tokenizer))
