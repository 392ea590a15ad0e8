"""Per-row vectorised sampling: penalties, temperature, top-k, top-p, seeded draws.

Every row has its own `torch.Generator` and draws exactly one uniform number per sampled token,
so a seeded request produces the same tokens whatever else shares its batch (and after a
preemption, since the generator lives as long as the request). Work that only some rows need
(penalties, top-k, the full sort for top-p) runs only when some row asks for it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SamplingBatch:
    """Per-row parameters for N rows, as tensors on the logits' device."""

    temperature: torch.Tensor  # [N] fp32; 0 = greedy
    top_p: torch.Tensor  # [N] fp32
    top_k: torch.Tensor  # [N] int64; 0 = off
    presence_penalty: torch.Tensor  # [N] fp32
    frequency_penalty: torch.Tensor  # [N] fp32
    output_token_ids: list[list[int]]  # generated tokens so far, for the penalties
    generators: list[torch.Generator | None]  # None for greedy rows


def apply_penalties(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """OpenAI presence/frequency penalties over each row's generated tokens (in place)."""
    num_rows, vocab = logits.shape
    max_len = max((len(ids) for ids in batch.output_token_ids), default=0)
    if max_len == 0:
        return logits
    ids = torch.full((num_rows, max_len), vocab, dtype=torch.long)  # [N, M]; `vocab` is a dump column
    for row, out_ids in enumerate(batch.output_token_ids):
        ids[row, : len(out_ids)] = torch.tensor(out_ids, dtype=torch.long)
    ids = ids.to(logits.device)
    counts = torch.zeros(num_rows, vocab + 1, device=logits.device)  # [N, V+1]
    counts.scatter_add_(1, ids, torch.ones_like(ids, dtype=counts.dtype))
    counts = counts[:, :vocab]  # [N, V]
    logits -= batch.frequency_penalty[:, None] * counts
    logits -= batch.presence_penalty[:, None] * (counts > 0).to(logits.dtype)
    return logits


def _top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Mask (to -inf) tokens outside each row's top-k and nucleus. logits: [N, V]."""
    vocab = logits.shape[1]
    if bool((top_k > 0).any()):
        k = torch.where(top_k > 0, top_k.clamp(max=vocab), torch.full_like(top_k, vocab))  # [N]
        kth = torch.topk(logits, int(k.max()), dim=-1).values.gather(1, (k - 1)[:, None])  # [N, 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if bool((top_p < 1.0).any()):
        sorted_logits, order = logits.sort(dim=-1, descending=True)  # [N, V]
        probs = sorted_logits.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs  # mass of strictly better tokens
        drop = mass_before > top_p[:, None]  # keeps at least the best token
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.empty_like(logits).scatter_(1, order, sorted_logits)
    return logits


def sample(logits: torch.Tensor, batch: SamplingBatch) -> list[int]:
    """Pick one token per row. logits: [N, V] fp32 (modified in place)."""
    if bool((batch.presence_penalty != 0).any() or (batch.frequency_penalty != 0).any()):
        logits = apply_penalties(logits, batch)
    greedy = batch.temperature <= 0  # [N]
    chosen = logits.argmax(dim=-1)  # [N]
    if bool(greedy.all()):
        return chosen.tolist()
    rows = (~greedy).nonzero().squeeze(1)  # [S] rows that sample
    scaled = logits[rows] / batch.temperature[rows, None]  # [S, V]
    scaled = _top_k_top_p(scaled, batch.top_k[rows], batch.top_p[rows])
    cdf = scaled.softmax(dim=-1).cumsum(dim=-1)  # [S, V]
    # One uniform per row from that row's own generator: independent of batch composition.
    uniforms = torch.stack(
        [torch.rand((), generator=batch.generators[int(r)], device=logits.device) for r in rows.tolist()]
    )  # [S]
    # right=True: a draw never lands on a zero-probability (masked) token.
    picked = torch.searchsorted(cdf, (uniforms * cdf[:, -1])[:, None], right=True).squeeze(1)  # [S]
    chosen[rows] = picked.clamp(max=logits.shape[1] - 1)
    return chosen.tolist()
