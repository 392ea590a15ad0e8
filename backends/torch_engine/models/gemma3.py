"""Gemma 3 text forward over a packed, mixed batch and a paged KV cache.

Reads the weights of a transformers `Gemma3ForCausalLM` and reimplements its forward for the
engine's batch layout: the tokens of every scheduled sequence (prefill chunks and decodes) are
packed into one [T] row, so every linear layer is one matmul over the whole step; only attention
looks at sequences separately, in groups the runner prepares (all decodes together, each prefill
chunk on its own) against keys gathered from the paged cache.

Gemma 3 specifics honoured here: embeddings scaled by sqrt(hidden); RMSNorm with (1 + weight)
computed in fp32; q/k RMSNorm per head; GQA; `query_pre_attn_scalar` as the softmax scale;
sliding-window layers (key within `sliding_window` of the query) with their own rope theta,
alternating with global layers; four norms per layer; gelu-tanh gated MLP; optional final logit
soft-capping. Shapes: T packed tokens, G rows in a group, Q queries per row, L keys per row,
H query heads, K kv heads, D head dim, E hidden size, V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F


@dataclass
class AttentionGroup:
    """Rows attended in one SDPA call; index tensors are prepared by the runner."""

    query_index: torch.Tensor  # [G, Q] packed token index of each query (padding repeats a real one)
    out_index: torch.Tensor  # [n] flat index into [G*Q] of the real queries
    token_index: torch.Tensor  # [n] packed token index those real queries belong to
    full_slots: torch.Tensor  # [G, L] cache slot of each key (a zeroed pad slot past the end)
    full_mask: torch.Tensor  # [G, 1, Q, L] bool, True = attend
    sliding_slots: torch.Tensor  # [G, Ls] keys for sliding layers (only the window)
    sliding_mask: torch.Tensor  # [G, 1, Q, Ls]


@dataclass
class ForwardBatch:
    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    slot_mapping: torch.Tensor  # [T] cache slot each new token's k/v is written to
    groups: list[AttentionGroup]
    logits_index: torch.Tensor  # [N] packed index of the tokens whose next-token logits we need


class Linear:
    """y = x @ W.T, with W prepacked for oneDNN on CPU when that is available.

    Why: decode batches are skinny ([<=16, E] x [E, N]); MKL's sgemm reaches a fraction of the
    memory bandwidth there, while oneDNN's prepacked matmul (what torch.compile's CPU freezing
    uses) is 1.3-2.3x faster on these shapes, the 262k-row LM head most of all. Results differ
    from F.linear only by summation order (~1e-4 absolute).
    """

    __slots__ = ("weight", "packed")

    def __init__(self, weight: torch.Tensor, *, pack: bool, keep_dense: bool = False) -> None:
        self.packed = _try_pack(weight) if pack else None
        self.weight = weight if (self.packed is None or keep_dense) else None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, None, "none", [], "")
        return F.linear(x, self.weight)


def _try_pack(weight: torch.Tensor) -> torch.Tensor | None:
    if weight.device.type != "cpu" or weight.dtype != torch.float32 or not torch.backends.mkldnn.is_available():
        return None
    try:
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, 16)
        probe = torch.ones(2, weight.shape[1], dtype=weight.dtype)
        ok = torch.allclose(
            torch.ops.mkldnn._linear_pointwise(probe, packed, None, "none", [], ""),
            F.linear(probe, weight), rtol=1e-3, atol=1e-3,
        )
        return packed if ok else None
    except (RuntimeError, AttributeError):  # op missing in this torch build: plain F.linear
        return None


@dataclass
class _Layer:
    qkv: Linear  # [(H + 2K) * D, E]
    o: Linear  # [E, H * D]
    gate_up: Linear  # [2I, E]
    down: Linear  # [E, I]
    q_norm: torch.Tensor  # [D] (1 + w), fp32
    k_norm: torch.Tensor
    input_norm: torch.Tensor  # [E] (1 + w), fp32
    post_attn_norm: torch.Tensor
    pre_ff_norm: torch.Tensor
    post_ff_norm: torch.Tensor
    is_sliding: bool


def _norm_weight(module: Any) -> torch.Tensor:
    return 1.0 + module.weight.detach().float()


class Gemma3Model:
    """Weights of a Gemma3ForCausalLM, rearranged for the packed forward (fused qkv and gate/up)."""

    def __init__(self, hf_model: Any, device: torch.device, dtype: torch.dtype, *, pack_weights: bool = True) -> None:
        cfg = hf_model.config
        if getattr(cfg, "model_type", "") != "gemma3_text":
            raise ValueError(f"expected a Gemma 3 text model, got model_type {cfg.model_type!r}")
        inner = hf_model.model
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        self.hidden_size = cfg.hidden_size
        self.num_layers = cfg.num_hidden_layers
        self.vocab_size = cfg.vocab_size
        self.sliding_window = int(cfg.sliding_window or 0)
        self.eps = cfg.rms_norm_eps
        self.scale = cfg.query_pre_attn_scalar**-0.5
        self.final_softcap = cfg.final_logit_softcapping
        if cfg.attn_logit_softcapping is not None:
            raise ValueError("attention logit soft-capping is not supported by the torch engine")
        self.dtype = dtype
        self.device = device

        def w(t: torch.Tensor) -> torch.Tensor:
            return t.detach().to(device=device, dtype=dtype).contiguous()

        self.embed = w(inner.embed_tokens.weight)  # [V, E]
        self.embed_scale = torch.tensor(cfg.hidden_size**0.5, dtype=torch.float32).to(dtype).item()
        lm_head = hf_model.get_output_embeddings().weight
        lm_head_weight = self.embed if lm_head is inner.embed_tokens.weight else w(lm_head)
        self.lm_head = Linear(lm_head_weight, pack=pack_weights)  # packing copies: embed stays dense
        self.weights_packed = self.lm_head.packed is not None
        self.final_norm = _norm_weight(inner.norm).to(device)
        self.layers: list[_Layer] = []
        for i, layer in enumerate(inner.layers):
            a, m = layer.self_attn, layer.mlp
            self.layers.append(
                _Layer(
                    qkv=Linear(w(torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight])), pack=pack_weights),
                    o=Linear(w(a.o_proj.weight), pack=pack_weights),
                    gate_up=Linear(w(torch.cat([m.gate_proj.weight, m.up_proj.weight])), pack=pack_weights),
                    down=Linear(w(m.down_proj.weight), pack=pack_weights),
                    q_norm=_norm_weight(a.q_norm).to(device),
                    k_norm=_norm_weight(a.k_norm).to(device),
                    input_norm=_norm_weight(layer.input_layernorm).to(device),
                    post_attn_norm=_norm_weight(layer.post_attention_layernorm).to(device),
                    pre_ff_norm=_norm_weight(layer.pre_feedforward_layernorm).to(device),
                    post_ff_norm=_norm_weight(layer.post_feedforward_layernorm).to(device),
                    is_sliding=cfg.layer_types[i] == "sliding_attention",
                )
            )
        rotary = inner.rotary_emb
        # Take inv_freq from transformers' own rotary module: it already applied any rope scaling.
        self.rope = {
            kind: (
                getattr(rotary, f"{kind}_inv_freq").detach().float().to(device),
                float(getattr(rotary, f"{kind}_attention_scaling")),
            )
            for kind in ("sliding_attention", "full_attention")
            if hasattr(rotary, f"{kind}_inv_freq")
        }

    def _rms(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps) * weight).to(x.dtype)

    def _cos_sin(self, positions: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq, scaling = self.rope[kind]
        freqs = positions[:, None].float() * inv_freq  # [T, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [T, D]
        cos = (emb.cos() * scaling).to(self.dtype)[:, None, :]  # [T, 1, D]
        sin = (emb.sin() * scaling).to(self.dtype)[:, None, :]
        return cos, sin

    @staticmethod
    def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos + rotated * sin

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch, kv_cache: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """One step over the packed batch; writes new k/v into `kv_cache`; returns [N, V] fp32 logits."""
        num_tokens = batch.input_ids.shape[0]
        h = F.embedding(batch.input_ids, self.embed) * self.embed_scale  # [T, E]
        rope = {kind: self._cos_sin(batch.positions, kind) for kind in self.rope}
        nq, nkv, d = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim, self.head_dim
        for layer, (k_cache, v_cache) in zip(self.layers, kv_cache, strict=True):
            residual = h
            x = self._rms(h, layer.input_norm)
            q, k, v = layer.qkv(x).split([nq, nkv, nkv], dim=-1)  # [T, H*D], [T, K*D], [T, K*D]
            q = self._rms(q.view(num_tokens, self.num_heads, d), layer.q_norm)  # [T, H, D]
            k = self._rms(k.view(num_tokens, self.num_kv_heads, d), layer.k_norm)  # [T, K, D]
            cos, sin = rope["sliding_attention" if layer.is_sliding else "full_attention"]
            q, k = self._rotate(q, cos, sin), self._rotate(k, cos, sin)
            k_cache.index_copy_(0, batch.slot_mapping, k)  # cache: [S, K, D]
            v_cache.index_copy_(0, batch.slot_mapping, v.view(num_tokens, self.num_kv_heads, d))
            attn = self._attention(q, k_cache, v_cache, batch.groups, layer.is_sliding)  # [T, H*D]
            h = residual + self._rms(layer.o(attn), layer.post_attn_norm)
            residual = h
            gate, up = layer.gate_up(self._rms(h, layer.pre_ff_norm)).chunk(2, dim=-1)  # [T, I] x2
            mlp = layer.down(F.gelu(gate, approximate="tanh") * up)  # [T, E]
            h = residual + self._rms(mlp, layer.post_ff_norm)
        if batch.logits_index.numel() == 0:  # only partial prefill chunks: nothing to sample
            return h.new_empty(0, self.vocab_size, dtype=torch.float32)
        h = self._rms(h[batch.logits_index], self.final_norm)  # [N, E]: only rows we sample from
        logits = self.lm_head(h).float()  # [N, V]
        if self.final_softcap is not None:  # in place: [N, V] is 16 MB at N=16, three passes over it
            logits.div_(self.final_softcap).tanh_().mul_(self.final_softcap)
        return logits

    def _attention(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        groups: list[AttentionGroup],
        is_sliding: bool,
    ) -> torch.Tensor:
        out = q.new_empty(q.shape[0], self.num_heads * self.head_dim)  # [T, H*D]
        for g in groups:
            slots, mask = (g.sliding_slots, g.sliding_mask) if is_sliding else (g.full_slots, g.full_mask)
            query = q[g.query_index].transpose(1, 2)  # [G, Q, H, D] -> [G, H, Q, D]
            key = k_cache[slots].transpose(1, 2)  # [G, L, K, D] -> [G, K, L, D]
            value = v_cache[slots].transpose(1, 2)
            o = F.scaled_dot_product_attention(
                query, key, value, attn_mask=mask, scale=self.scale, enable_gqa=self.num_heads != self.num_kv_heads
            )  # [G, H, Q, D]
            o = o.transpose(1, 2).reshape(-1, self.num_heads * self.head_dim)  # [G*Q, H*D]
            out[g.token_index] = o[g.out_index]
        return out
