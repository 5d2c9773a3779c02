"""Chat data for SFT: conversations rendered by the tokenizer's chat template, a loss mask over
the assistant's tokens, and packing of whole conversations into rows.

Legend: T sequence length, R rows. A conversation is a list of messages {"role", "content"}
(tokenizers.py); a JSONL chat file holds one {"messages": [...]} a line.

    ids, mask = render(tokenizer, messages)   # mask 1 on each assistant reply and its eos
    tokens, segments, masks, real = pack([(ids, mask), ...], seq_len)   # each [R, T + 1]

The mask is found the way the template itself draws the turns: assistant turn i's tokens are
those after the rendering of messages[:i] with the generation prompt ("Assistant:") and up to
the end of the rendering of messages[:i + 1]. So the model learns to continue exactly the
prompt that generation will give it, and never learns to write the user's turns.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import numpy as np

from deepseek_jax.data import sources


def read_conversations(path: str, field: str = "messages") -> Iterator[list[dict]]:
    """The `field` of every line of the JSONL files at `path` (a file, folder or glob)."""
    for name in sources.expand(path, ".jsonl"):
        with open(name, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                record = json.loads(line)
                if not isinstance(record.get(field), list):
                    raise KeyError(
                        f"{name}:{number} has no list {field!r} of messages (fields: "
                        f"{sorted(record)}); set --config.data.text_field"
                    )
                yield record[field]


def render(tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """A conversation -> its ids [n] and loss mask [n] (1 on assistant tokens, eos included)."""
    ids = tokenizer.encode_chat(messages, add_generation_prompt=False)
    mask = [0] * len(ids)
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = tokenizer.encode_chat(messages[:i], add_generation_prompt=True)
        turn = tokenizer.encode_chat(messages[: i + 1], add_generation_prompt=False)
        start = len(prompt)
        if ids[: len(turn)] != turn or turn[:start] != prompt:
            raise ValueError(
                f"message {i}: the chat template does not render this conversation as a growing "
                "prefix (an earlier turn changes when a later one is added, or the tokenizer "
                "merges across the turn boundary), so its assistant tokens cannot be masked"
            )
        mask[start : len(turn)] = [1] * (len(turn) - start)
    return ids, mask


def pack(
    conversations: list[tuple[list[int], list[int]]], seq_len: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Whole conversations laid end to end into rows of T + 1 tokens; one that does not fit
    what is left of a row starts the next, and one longer than T + 1 is cut to its first
    T + 1 tokens. Returns tokens, segments (0, 1, ... per conversation; the padding at a row's
    end is a segment of its own), loss masks (0 on padding) and `real` (1 on the
    conversations' tokens, 0 on the padding: what the balance losses count), each [R, T + 1]
    int32."""
    width = seq_len + 1
    rows: list[list[tuple[list[int], list[int]]]] = [[]]
    used = 0
    for ids, mask in conversations:
        ids, mask = ids[:width], mask[:width]
        if used + len(ids) > width:
            rows.append([])
            used = 0
        rows[-1].append((ids, mask))
        used += len(ids)
    tokens, segments, masks, real = (np.zeros((len(rows), width), np.int32) for _ in range(4))
    for r, row in enumerate(rows):
        at = 0
        for s, (ids, mask) in enumerate(row):
            tokens[r, at : at + len(ids)] = ids
            segments[r, at : at + len(ids)] = s
            masks[r, at : at + len(ids)] = mask
            at += len(ids)
        real[r, :at] = 1
        segments[r, at:] = len(row)
    return tokens, segments, masks, real


def chat_rows(
    path: str, tokenizer, seq_len: int, holdout_fraction: float, field: str = "messages"
) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """{"train", "eval"} -> packed (tokens, segments, masks, real); the last `holdout_fraction` of
    the conversations (in file order) are held out."""
    rendered = [render(tokenizer, m) for m in read_conversations(path, field)]
    held = int(round(len(rendered) * holdout_fraction))
    splits = {"train": rendered[: len(rendered) - held], "eval": rendered[len(rendered) - held :]}
    for split, part in splits.items():
        if not part:
            raise ValueError(
                f"{path}: the {split} split of {len(rendered)} conversations is empty at "
                f"data.holdout_fraction={holdout_fraction}: add conversations or change it"
            )
    return {split: pack(part, seq_len) for split, part in splits.items()}
