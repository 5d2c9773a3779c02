"""Packing documents into fixed-length rows, and rows into training examples.

Legend: T sequence length, R rows. A row holds T + 1 tokens; consecutive rows overlap by one
token (stride T), so every token of the stream is a target exactly once. Documents are laid
end to end; a row's `segments` number its documents 0, 1, ... from the left. An example gives
the model `inputs`, `positions` that restart at each document, `segment_ids` that confine
attention to one document, and `weights` that drop the one target per boundary that would
predict a new document from the old one.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np


def split_stream(
    docs: list[np.ndarray], holdout_fraction: float
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Cuts the token stream so the last `holdout_fraction` of its tokens are held out.

    The document that straddles the cut is split in two; each half stays one document.
    """
    if not 0.0 <= holdout_fraction < 1.0:
        raise ValueError(f"data.holdout_fraction={holdout_fraction}: must lie in [0, 1)")
    lengths = np.array([len(d) for d in docs], np.int64)
    cut = int(round(lengths.sum() * (1.0 - holdout_fraction)))
    ends = np.cumsum(lengths)
    i = int(np.searchsorted(ends, cut, side="right"))
    if i == len(docs):
        return docs, []
    inside = cut - (ends[i] - lengths[i])  # tokens of doc i left in the training part
    train = docs[:i] + ([docs[i][:inside]] if inside else [])
    return train, [docs[i][inside:]] + docs[i + 1 :]


def pack(docs: Iterable[np.ndarray], seq_len: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Rows (tokens [T + 1], segments [T + 1] int32) with stride T; a short tail is dropped."""
    tokens, segments = [], []
    buffered, doc_index = 0, 0
    for doc in docs:
        if len(doc) == 0:
            continue
        tokens.append(np.asarray(doc))
        segments.append(np.full(len(doc), doc_index, np.int64))
        buffered += len(doc)
        doc_index += 1
        if buffered < seq_len + 1:
            continue
        flat_tokens, flat_segments = np.concatenate(tokens), np.concatenate(segments)
        start = 0
        while start + seq_len + 1 <= len(flat_tokens):
            yield (
                flat_tokens[start : start + seq_len + 1],
                renumber(flat_segments[start : start + seq_len + 1]),
            )
            start += seq_len
        tokens, segments = [flat_tokens[start:]], [flat_segments[start:]]
        buffered = len(tokens[0])


def renumber(segments: np.ndarray) -> np.ndarray:
    """Document indices -> 0, 1, ... within the row."""
    starts = np.concatenate([[0], (segments[1:] != segments[:-1]).astype(np.int32)])
    return np.cumsum(starts).astype(np.int32)


def example(
    tokens: np.ndarray,
    segments: np.ndarray,
    loss_mask: np.ndarray | None = None,
    real: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """One row (tokens [T + 1], segments [T + 1]) -> model inputs and loss targets, each [T].

    `loss_mask` [T + 1] (chat rows, `deepseek_jax.data.chat`): 1 on the tokens to learn (an
    assistant's), 0 on the rest; a target is weighted only where it is 1. `real` [T + 1] (chat
    rows): 0 on padding; it becomes `token_mask`, the inputs the MoE balance losses count.
    Packed text has no padding, hence no `token_mask` (every input counts)."""
    inputs, targets = tokens[:-1], tokens[1:]
    seg_in = segments[:-1]
    index = np.arange(len(inputs))
    first = np.concatenate([[True], seg_in[1:] != seg_in[:-1]])
    positions = index - np.maximum.accumulate(np.where(first, index, 0))
    mask = np.ones_like(segments) if loss_mask is None else loss_mask
    fields = {
        "inputs": inputs.astype(np.int32),
        "targets": targets.astype(np.int32),
        "positions": positions.astype(np.int32),
        "segment_ids": seg_in.astype(np.int32),
        "weights": ((segments[1:] == seg_in) & (mask[1:] > 0)).astype(np.float32),
    }
    if real is not None:
        fields["token_mask"] = (real[:-1] > 0).astype(np.float32)
    return fields


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype that holds every id (bytes fit uint8: a quarter the memory)."""
    for dtype in (np.uint8, np.uint16, np.uint32):
        if vocab_size <= np.iinfo(dtype).max + 1:
            return np.dtype(dtype)
    raise ValueError(f"vocab_size={vocab_size} does not fit uint32")
