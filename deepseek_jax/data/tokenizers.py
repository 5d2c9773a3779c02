"""Tokenizers: a byte-level default that needs no files.

Legend: ids are Python ints; a batch of them is a list of lists.
"""

from __future__ import annotations


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255. No special tokens: the default corpus needs none."""

    vocab_size = 256
    bos_id: int | None = None
    eos_id: int | None = None

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")
