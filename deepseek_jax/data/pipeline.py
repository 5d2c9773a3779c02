"""Grain pipelines: documents -> packed rows -> shuffled, sharded, batched examples.

Legend: B per-process batch, T sequence length.

Rows come from memory (a text source tokenized at start-up: fine for tens of MB, such as the
default standard-library corpus) or from ArrayRecord files written once by `prepare` (any
size; random access from disk). Training batches are a seeded global shuffle of the rows,
reshuffled each epoch, then this process's 1/P share of them: the iterator's state (an index)
is saved with each checkpoint and restores the exact next batch.

The batch size may change with the step (`BatchSizes`: the paper's batch ramp, 3.2.1): batch
i then holds the next `BatchSizes.at(i + 1)` examples of the same endless stream, so a ramp
reorders nothing and a resumed run still reads exactly what a straight one would.
"""

from __future__ import annotations

import bisect
import dataclasses
import json
import os
import sys

import grain
import numpy as np

from deepseek_jax.data import chat, packing, sources
from deepseek_jax.data.tokenizers import TOKENIZER_FILE, ByteTokenizer, HFTokenizer
from deepseek_jax.errors import UserError

META = "meta.json"


@dataclasses.dataclass(frozen=True)
class DataSettings:
    """Where a run's text comes from and how it is cut (a run config's `data` section)."""

    source: str = "stdlib"  # stdlib | text | jsonl | parquet | arrayrecord | chat
    path: str = ""  # file, folder or glob (arrayrecord: the `prepare` output folder)
    text_field: str = "text"  # jsonl / parquet; chat: the messages field
    tokenizer: str = "byte"  # "byte" or a folder holding tokenizer.json
    seq_len: int = 256
    holdout_fraction: float = 0.01  # the last 1% of the token stream is held out


def make_tokenizer(name: str) -> ByteTokenizer | HFTokenizer:
    """ "byte", or a directory holding an HF `tokenizer.json`."""
    if name == "byte":
        return ByteTokenizer()
    if os.path.exists(os.path.join(name, TOKENIZER_FILE)):
        return HFTokenizer(name)
    raise ValueError(f"data.tokenizer={name!r}: give 'byte' or a directory with a {TOKENIZER_FILE}")


def tokenize(tokenizer, texts, dtype: np.dtype) -> list[np.ndarray]:
    """Each document -> a token array of `dtype`."""
    if isinstance(tokenizer, ByteTokenizer):
        # Same ids as tokenizer.encode, without a Python int per byte (~30 M for the stdlib).
        return [np.frombuffer(t.encode("utf-8"), np.uint8).astype(dtype) for t in texts]
    return [np.asarray(tokenizer.encode(t), dtype) for t in texts]


def packed_rows(
    data_cfg: DataSettings, tokenizer, seq_len: int
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{"train", "eval"} -> (tokens [R, T + 1], segments [R, T + 1]) from a text source."""
    texts = sources.documents(data_cfg.source, data_cfg.path, data_cfg.text_field)
    docs = tokenize(tokenizer, texts, packing.token_dtype(tokenizer.vocab_size))
    splits = dict(
        zip(("train", "eval"), packing.split_stream(docs, data_cfg.holdout_fraction), strict=True)
    )
    rows = {}
    for split, part in splits.items():
        packed = list(packing.pack(part, seq_len))
        if not packed:
            raise ValueError(
                f"the {split} split has fewer than seq_len + 1 = {seq_len + 1} tokens: "
                "add data, lower data.seq_len or raise data.holdout_fraction"
            )
        tokens, segments = zip(*packed, strict=True)
        rows[split] = (np.stack(tokens), np.stack(segments).astype(np.uint16))
    return rows


class InMemoryRows:
    """Random access to packed rows held in memory: row i -> (tokens, segments), or (tokens,
    segments, loss mask, real) for chat rows (`chat.pack`)."""

    def __init__(self, tokens_RT: np.ndarray, segments_RT: np.ndarray, *chat_RT: np.ndarray):
        self.fields = (tokens_RT, segments_RT, *chat_RT)

    def __len__(self) -> int:
        return len(self.fields[0])

    def __getitem__(self, i: int) -> tuple[np.ndarray, ...]:
        return tuple(field[i] for field in self.fields)


def encode_row(tokens: np.ndarray, segments: np.ndarray) -> bytes:
    """The ArrayRecord record: int32 tokens [T + 1] then int32 segments [T + 1], raw bytes."""
    return np.concatenate([tokens, segments]).astype("<i4").tobytes()


def decode_row(record: bytes) -> tuple[np.ndarray, np.ndarray]:
    both = np.frombuffer(record, "<i4")
    return both[: len(both) // 2], both[len(both) // 2 :]


def row_datasets(data_cfg: DataSettings, seq_len: int) -> tuple[dict[str, grain.MapDataset], str]:
    """{"train", "eval"} -> a MapDataset of (tokens, segments) rows, and the tokenizer name."""
    if data_cfg.source == "arrayrecord":
        meta = read_meta(data_cfg.path)
        if meta["seq_len"] != seq_len:
            raise ValueError(
                f"{data_cfg.path} holds rows of seq_len {meta['seq_len']}, not data.seq_len="
                f"{seq_len}: set --config.data.seq_len={meta['seq_len']} or prepare again"
            )
        datasets = {
            split: grain.MapDataset.source(
                grain.sources.ArrayRecordDataSource(
                    os.path.join(data_cfg.path, f"{split}.arrayrecord")
                )
            ).map(decode_row)
            for split in ("train", "eval")
        }
        return datasets, meta["tokenizer"]
    tokenizer = make_tokenizer(data_cfg.tokenizer)
    if data_cfg.source == "chat":  # SFT: whole conversations, loss on the assistant's tokens
        rows = chat.chat_rows(
            data_cfg.path, tokenizer, seq_len, data_cfg.holdout_fraction, data_cfg.text_field
        )
    else:
        rows = packed_rows(data_cfg, tokenizer, seq_len)
    datasets = {s: grain.MapDataset.source(InMemoryRows(*r)) for s, r in rows.items()}
    return datasets, data_cfg.tokenizer


def read_meta(directory: str) -> dict:
    path = os.path.join(directory, META)
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{path} not found: write the ArrayRecord data with "
            "`deepseek-jax-prepare --config CONFIG --out DIR` first"
        ) from None


def to_examples(rows: grain.MapDataset) -> grain.MapDataset:
    return rows.map(lambda row: packing.example(*row))


@dataclasses.dataclass(frozen=True)
class BatchSizes:
    """The batch size (sequences) of each step, steps counted from 1: stage i starts at step
    `starts[i]` with `sizes[i]` sequences; the last stage holds to the end of training."""

    sizes: tuple[int, ...]
    starts: tuple[int, ...] = (1,)

    def __post_init__(self):
        if len(self.sizes) != len(self.starts) or self.starts[0] != 1:
            raise ValueError(f"{self}: one start per size, the first at step 1")
        if any(b <= a for a, b in zip(self.starts[:-1], self.starts[1:], strict=True)):
            raise ValueError(f"{self}: stage starts must increase")

    def at(self, step: int) -> int:
        """Sequences in step `step`."""
        return self.sizes[bisect.bisect_right(self.starts, step) - 1]

    def before(self, step: int) -> int:
        """Sequences in steps 1 .. step - 1."""
        ends = self.starts[1:] + (sys.maxsize,)
        return sum(
            size * max(0, min(step, end) - start)
            for size, start, end in zip(self.sizes, self.starts, ends, strict=True)
        )

    def per_process(self, processes: int) -> BatchSizes:
        return BatchSizes(tuple(size // processes for size in self.sizes), self.starts)


class StepBatches(grain.MapDataset):
    """Batch i (training step i + 1) stacks examples [before(i + 1), before(i + 2)) of this
    process's share of an endless, per-epoch reshuffled example stream: [B_step, T] fields."""

    def __init__(self, examples: grain.MapDataset, sizes: BatchSizes, shard: int, shards: int):
        super().__init__(examples)
        self.sizes, self.shard, self.shards = sizes, shard, shards

    def __len__(self) -> int:
        return sys.maxsize

    def __str__(self) -> str:
        return f"StepBatches(sizes={self.sizes}, shard={self.shard}/{self.shards})"

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        first = self.sizes.before(index + 1)
        local = range(first, first + self.sizes.at(index + 1))
        # Process p reads every P-th example of the one global order (the shuffle reshuffles
        # each epoch for indices past its length).
        items = self._parent._getitems([j * self.shards + self.shard for j in local])
        return {key: np.stack([item[key] for item in items]) for key in items[0]}


def train_batches(
    rows: grain.MapDataset,
    batch: int | BatchSizes,
    seed: int,
    shard: int = 0,
    shards: int = 1,
) -> grain.MapDataset:
    """Endless batches [B, T] of this process's share of the rows, shuffled per epoch.

    `batch`: this process's batch size, or a `BatchSizes` of this process's (a ramp)."""
    sizes = batch if isinstance(batch, BatchSizes) else BatchSizes((batch,))
    if len(rows) // shards < max(sizes.sizes):
        raise UserError(
            f"{len(rows)} training rows over {shards} processes cannot fill a batch of "
            f"{max(sizes.sizes)}: add data or lower train.batch_size"
        )
    return StepBatches(to_examples(rows.shuffle(seed)), sizes, shard, shards)


def eval_batches(
    rows: grain.MapDataset, batch: int, max_batches: int, shard: int = 0, shards: int = 1
) -> grain.MapDataset:
    """The first `max_batches` batches of this process's held-out rows, in order (0: all)."""
    # Every process reads as many rows (their counts differ by one when the split does not
    # divide), so that all run the same number of eval steps.
    rows = rows[shard::shards][: len(rows) // shards]
    count = len(rows) // batch if max_batches == 0 else min(max_batches, len(rows) // batch)
    if count == 0:
        raise ValueError(
            f"{len(rows)} held-out rows cannot fill an eval batch of {batch}: "
            "raise data.holdout_fraction or lower train.batch_size"
        )
    return to_examples(rows[: count * batch]).batch(batch, drop_remainder=True)
