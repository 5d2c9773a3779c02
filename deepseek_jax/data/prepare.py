"""Tokenizes and packs a text source once into ArrayRecord files for any-size training.

    deepseek-jax-prepare --config tiny \
        --config.data.source=jsonl --config.data.path='data/*.jsonl' --out data/packed
    deepseek-jax-train --config tiny \
        --config.data.source=arrayrecord --config.data.path=data/packed

(the command is deepseek_jax/cli/prepare.py).

Writes train.arrayrecord and eval.arrayrecord (one packed row a record, see pipeline.encode_row)
and meta.json (seq_len, tokenizer, row counts), which train.py checks against its config.
"""

from __future__ import annotations

import json
import os

from array_record.python.array_record_module import ArrayRecordWriter

from deepseek_jax.data import pipeline
from deepseek_jax.errors import UserError


def prepare(data_cfg: pipeline.DataSettings, out: str) -> dict:
    """Writes the rows of both splits under `out`; returns the metadata it saved."""
    if data_cfg.source == "arrayrecord":
        raise UserError("data.source='arrayrecord' is already prepared: give a text source")
    os.makedirs(out, exist_ok=True)
    tokenizer = pipeline.make_tokenizer(data_cfg.tokenizer)
    rows = pipeline.packed_rows(data_cfg, tokenizer, data_cfg.seq_len)
    for split, (tokens, segments) in rows.items():
        # group_size:1 keeps every record independently readable: training reads at random.
        writer = ArrayRecordWriter(os.path.join(out, f"{split}.arrayrecord"), "group_size:1")
        for t, s in zip(tokens, segments, strict=True):
            writer.write(pipeline.encode_row(t, s))
        writer.close()
    meta = {
        "seq_len": data_cfg.seq_len,
        "tokenizer": data_cfg.tokenizer,
        "vocab_size": tokenizer.vocab_size,
        "rows": {split: len(r[0]) for split, r in rows.items()},
    }
    with open(os.path.join(out, pipeline.META), "w") as f:
        json.dump(meta, f, indent=1)
    return meta
