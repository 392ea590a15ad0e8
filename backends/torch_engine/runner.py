"""Runs one engine step on the device: batch layout, the model forward, sampling.

The only engine module that touches torch devices. Each step packs the scheduled tokens of all
sequences into one [T] row (see models/gemma3.py), writes their keys/values into the paged cache
and samples one token for every sequence whose step reached its last token.

Why paged blocks rather than one static cache row per slot: a static [max_num_seqs,
max_model_len] cache reserves the whole context for every seat (Gemma 3's 32k context x 16 seats
would be gigabytes on a laptop), while blocks follow real lengths and let the scheduler trade
memory for recomputation (preemption) under an explicit budget (`num_kv_blocks`). The price is a
gather of each row's keys per layer (`k_cache[slots]`), which is small next to the matmuls at
these sizes. Sliding-window layers gather only the window (plus the chunk) of each row.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence as Seq

import torch

from backends.torch_engine.models.gemma3 import AttentionGroup, ForwardBatch, Gemma3Model
from backends.torch_engine.sampler import SamplingBatch, sample
from backends.torch_engine.scheduler import ScheduledSequence
from backends.torch_engine.sequence import Sequence

# (packed offset, first position, number of new tokens, block table) of one scheduled row
_Row = tuple[int, int, int, list[int]]
_SHORT_ROW = 16  # rows up to this many tokens share one padded attention call


class ModelRunner:
    """Owns the model, the KV pool tensors and each request's random generator."""

    def __init__(self, model: Gemma3Model, *, num_blocks: int, block_size: int) -> None:
        self.model = model
        self.device = model.device
        self.block_size = block_size
        self.pad_block = num_blocks  # one extra, zeroed block: keys past a row's end read it
        self.pad_slot = num_blocks * block_size
        num_slots = (num_blocks + 1) * block_size
        shape = (num_slots, model.num_kv_heads, model.head_dim)  # [S, K, D] per layer
        # empty, not zeros: untouched pages cost no RAM on CPU; only written slots are ever read.
        self.kv_cache = [
            (torch.empty(shape, dtype=model.dtype, device=self.device), torch.empty(shape, dtype=model.dtype, device=self.device))
            for _ in range(model.num_layers)
        ]
        for k, v in self.kv_cache:
            k[self.pad_slot :].zero_()
            v[self.pad_slot :].zero_()
        self._generators: dict[int, torch.Generator] = {}

    @torch.inference_mode()
    def execute(self, scheduled: Seq[ScheduledSequence]) -> list[tuple[Sequence, list[int]]]:
        """Forward the step's tokens; return (sequence, new tokens) for rows that sample.

        A row without drafts gets one sampled token. A row with d drafts (greedy only) gets the
        drafts the model agrees with, in order, plus the model's own next token (1..d+1 tokens).
        """
        batch, sampling_rows = self._prepare(scheduled)
        logits = self.model.forward(batch, self.kv_cache)  # [N, V]; N = sum of (drafts + 1)
        if not sampling_rows:
            return []
        plain: list[tuple[int, Sequence]] = []  # (logits row, seq)
        row = 0
        for seq, num_draft in sampling_rows:
            if num_draft == 0:
                plain.append((row, seq))
            row += num_draft + 1
        new_tokens: dict[int, list[int]] = {}
        if plain:
            rows = [r for r, _ in plain]
            plain_logits = logits if len(rows) == logits.shape[0] else logits[rows]  # [P, V]
            sampled = sample(plain_logits, self._sampling_batch([s for _, s in plain]))
            new_tokens.update((s.seq_id, [t]) for (_, s), t in zip(plain, sampled, strict=True))
        if len(plain) < len(sampling_rows):
            predicted = logits.argmax(dim=-1).tolist()  # [N] greedy choice after each position
            row = 0
            for seq, num_draft in sampling_rows:
                if num_draft:
                    preds, drafts = predicted[row : row + num_draft + 1], seq.draft_token_ids
                    accepted = 0
                    while accepted < num_draft and drafts[accepted] == preds[accepted]:
                        accepted += 1
                    new_tokens[seq.seq_id] = [*drafts[:accepted], preds[accepted]]
                row += num_draft + 1
        return [(seq, new_tokens[seq.seq_id]) for seq, _ in sampling_rows]

    def release(self, seq_id: int) -> None:
        """Forget a finished request's generator."""
        self._generators.pop(seq_id, None)

    # ------------------------------------------------------------------ batch layout
    def _prepare(self, scheduled: Seq[ScheduledSequence]) -> tuple[ForwardBatch, list[tuple[Sequence, int]]]:
        bs = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        short_rows: list[_Row] = []  # decodes (+ drafts) and short chunks: one attention call
        long_rows: list[_Row] = []  # long prefill chunks: one call each, no padding waste
        logits_index: list[int] = []
        sampling_rows: list[tuple[Sequence, int]] = []  # (seq, number of draft tokens)
        for item in scheduled:
            seq, start, n, d = item.seq, item.seq.num_computed_tokens, item.num_new_tokens, item.num_draft_tokens
            offset = len(input_ids)
            table = seq.block_table
            input_ids.extend(seq.token_ids[start : start + n - d])
            input_ids.extend(seq.draft_token_ids[:d])
            positions.extend(range(start, start + n))
            slots.extend(table[p // bs] * bs + p % bs for p in range(start, start + n))
            (short_rows if n <= _SHORT_ROW else long_rows).append((offset, start, n, table))
            if item.samples:
                logits_index.extend(range(offset + n - d - 1, offset + n))
                sampling_rows.append((seq, d))
        groups = ([self._group(short_rows)] if short_rows else []) + [self._group([r]) for r in long_rows]
        dev = self.device
        batch = ForwardBatch(
            input_ids=torch.tensor(input_ids, dtype=torch.long).to(dev),
            positions=torch.tensor(positions, dtype=torch.long).to(dev),
            slot_mapping=torch.tensor(slots, dtype=torch.long).to(dev),
            groups=groups,
            logits_index=torch.tensor(logits_index, dtype=torch.long).to(dev),
        )
        return batch, sampling_rows

    def _group(self, rows: list[_Row]) -> AttentionGroup:
        """Index tensors for rows attended together (queries padded to the longest row)."""
        offsets = torch.tensor([r[0] for r in rows])  # [G]
        starts = torch.tensor([r[1] for r in rows])  # [G]
        lengths = torch.tensor([r[2] for r in rows])  # [G]
        q_ar = torch.arange(int(lengths.max()))  # [Q]
        q_valid = q_ar[None, :] < lengths[:, None]  # [G, Q]
        q_clamped = torch.minimum(q_ar[None, :], (lengths - 1)[:, None])  # padding repeats the last query
        query_index = offsets[:, None] + q_clamped  # [G, Q]
        q_pos = starts[:, None] + q_clamped  # [G, Q]
        ends = starts + lengths  # [G] context length after this step
        max_blocks = max(len(r[3]) for r in rows)
        tables = torch.full((len(rows), max_blocks), self.pad_block, dtype=torch.long)  # [G, B]
        for i, r in enumerate(rows):
            tables[i, : len(r[3])] = torch.tensor(r[3], dtype=torch.long)
        full_slots, full_mask = self._keys(tables, torch.zeros_like(starts), ends, q_pos, window=0)
        window = self.model.sliding_window
        if window > 0:
            sliding_start = (starts - window + 1).clamp(min=0)  # older keys are outside every query's window
            sliding_slots, sliding_mask = self._keys(tables, sliding_start, ends, q_pos, window=window)
        else:
            sliding_slots, sliding_mask = full_slots, full_mask
        dev = self.device
        return AttentionGroup(
            query_index=query_index.to(dev),
            out_index=q_valid.flatten().nonzero().squeeze(1).to(dev),
            token_index=query_index[q_valid].to(dev),
            full_slots=full_slots.to(dev),
            full_mask=full_mask.to(dev),
            sliding_slots=sliding_slots.to(dev),
            sliding_mask=sliding_mask.to(dev),
        )

    def _keys(
        self, tables: torch.Tensor, key_start: torch.Tensor, ends: torch.Tensor, q_pos: torch.Tensor, window: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Cache slots [G, L] of keys key_start..end-1 per row and the mask [G, 1, Q, L]."""
        num_keys = int((ends - key_start).max())
        key_pos = key_start[:, None] + torch.arange(num_keys)[None, :]  # [G, L]
        valid = key_pos < ends[:, None]  # [G, L]
        safe_pos = torch.where(valid, key_pos, 0)
        blocks = tables.gather(1, safe_pos // self.block_size)  # [G, L]
        slots = torch.where(valid, blocks * self.block_size + safe_pos % self.block_size, self.pad_slot)
        mask = valid[:, None, :] & (key_pos[:, None, :] <= q_pos[:, :, None])  # [G, Q, L] causal
        if window > 0:
            mask &= key_pos[:, None, :] > q_pos[:, :, None] - window  # Gemma: q - k < window
        return slots, mask[:, None, :, :]

    # ------------------------------------------------------------------ sampling
    def _sampling_batch(self, seqs: list[Sequence]) -> SamplingBatch:
        dev = self.device
        params = [s.sampling for s in seqs]
        needs_penalty = any(p.presence_penalty or p.frequency_penalty for p in params)
        return SamplingBatch(
            temperature=torch.tensor([p.temperature for p in params], dtype=torch.float32).to(dev),
            top_p=torch.tensor([p.top_p for p in params], dtype=torch.float32).to(dev),
            top_k=torch.tensor([p.top_k for p in params], dtype=torch.long).to(dev),
            presence_penalty=torch.tensor([p.presence_penalty for p in params], dtype=torch.float32).to(dev),
            frequency_penalty=torch.tensor([p.frequency_penalty for p in params], dtype=torch.float32).to(dev),
            output_token_ids=[s.output_token_ids for s in seqs] if needs_penalty else [],
            generators=[self._generator(s) if s.sampling.temperature > 0 else None for s in seqs],
        )

    def _generator(self, seq: Sequence) -> torch.Generator:
        gen = self._generators.get(seq.seq_id)
        if gen is None:
            seed = seq.sampling.seed if seq.sampling.seed is not None else secrets.randbits(63)
            gen = torch.Generator(device=self.device).manual_seed(seed)
            self._generators[seq.seq_id] = gen
        return gen
