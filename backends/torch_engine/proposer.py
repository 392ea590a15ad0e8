"""Draft tokens for speculative decoding by prompt lookup (n-gram matching; plain Python).

For a greedy sequence, find the most recent earlier occurrence of its last n tokens (n from
`max_ngram` down to `min_ngram`) and propose the tokens that followed it. The runner verifies all
drafts in the same forward pass as the sequence's regular token and keeps the longest prefix the
model agrees with, plus the model's own next token, so the output is exactly greedy decoding:
drafts only change how many forward passes it takes. Repetitive text (lists, code, quoting the
prompt) gets several tokens per pass; text with no repetition costs a few wasted positions.
"""

from __future__ import annotations

_SEARCH_WINDOW = 1024  # tokens searched back; bounds the per-step cost on long sequences


def propose_ngram(token_ids: list[int], num_draft: int, *, max_ngram: int = 4, min_ngram: int = 2) -> list[int]:
    """Up to `num_draft` tokens that followed the latest earlier match of the sequence's tail."""
    if num_draft <= 0:
        return []
    tokens = token_ids[-_SEARCH_WINDOW:]
    length = len(tokens)
    for n in range(min(max_ngram, length - 1), min_ngram - 1, -1):
        tail = tokens[-n:]
        # Latest start i < length - n whose n tokens equal the tail (the tail itself excluded).
        for i in range(length - n - 1, -1, -1):
            if tokens[i : i + n] == tail:
                return tokens[i + n : i + n + num_draft]
    return []
