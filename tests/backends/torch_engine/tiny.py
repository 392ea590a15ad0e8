"""A tiny random Gemma 3 and a word-level tokenizer, built in-process (no downloads)."""

from __future__ import annotations

from typing import Any

WORDS = [f"w{i}" for i in range(60)]
SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<end_of_turn>"]


def tiny_tokenizer() -> Any:
    """PreTrainedTokenizerFast over a word-level vocabulary: pad=0, eos=1, bos=2, unk=3."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=["<end_of_turn>"],
    )


def tiny_gemma3(seed: int = 0, sliding_window: int = 6) -> Any:
    """A 4-layer Gemma3ForCausalLM (sliding, sliding, global, sliding) with a small window."""
    import torch
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    config = Gemma3TextConfig(
        vocab_size=len(SPECIALS) + len(WORDS),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        query_pre_attn_scalar=16,
        max_position_embeddings=512,
        sliding_window=sliding_window,
        layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
        rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
            "full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0},
        },
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
    )
    torch.manual_seed(seed)
    model = Gemma3ForCausalLM(config)
    with torch.no_grad():  # random norms too, so a wrong (1 + w) convention would show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0.0, 0.3)
            else:
                p.normal_(0.0, 0.15)
    return model.eval()
