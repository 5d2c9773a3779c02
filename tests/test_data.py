"""Data: sources, packing with document boundaries, the grain pipeline, prepare/ArrayRecord."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from train_helpers import small_config, typed

from deepseek_jax.data import packing, pipeline, sources
from deepseek_jax.data.prepare import prepare


def test_split_stream_holds_out_the_last_tokens():
    docs = [np.arange(10), np.arange(10, 30), np.arange(30, 40)]
    train, held = packing.split_stream(docs, 0.25)
    assert np.array_equal(np.concatenate(train), np.arange(30))
    assert np.array_equal(np.concatenate(held), np.arange(30, 40))
    train, held = packing.split_stream(docs, 0.1)  # cuts inside the last document
    assert [len(d) for d in train] == [10, 20, 6] and [len(d) for d in held] == [4]


def test_packing_restarts_positions_and_masks_document_boundaries():
    docs = [np.arange(1, 4), np.arange(10, 16), np.arange(20, 30)]  # lengths 3, 6, 10
    rows = list(packing.pack(docs, seq_len=8))
    # Stride 8, rows of 9: every token of the stream is a target exactly once.
    stream = np.concatenate(docs)
    assert len(rows) == 2
    for i, (tokens, _) in enumerate(rows):
        assert np.array_equal(tokens, stream[i * 8 : i * 8 + 9])
    ex = packing.example(*rows[0])
    assert ex["inputs"].tolist() == [1, 2, 3, 10, 11, 12, 13, 14]
    assert ex["segment_ids"].tolist() == [0, 0, 0, 1, 1, 1, 1, 1]
    assert ex["positions"].tolist() == [0, 1, 2, 0, 1, 2, 3, 4]
    # Token 3 -> 10 crosses documents: its target is excluded.
    assert ex["weights"].tolist() == [1, 1, 0, 1, 1, 1, 1, 1]
    second = packing.example(*rows[1])  # starts mid-document: positions restart at the row
    assert second["positions"].tolist() == [0, 0, 1, 2, 3, 4, 5, 6]
    assert second["weights"].tolist() == [0, 1, 1, 1, 1, 1, 1, 1]


def test_text_jsonl_and_parquet_sources(tmp_path):
    (tmp_path / "a.txt").write_text("alpha")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.txt").write_text("beta")
    assert list(sources.documents("text", str(tmp_path))) == ["alpha", "beta"]
    assert list(sources.documents("text", str(tmp_path / "*.txt"))) == ["alpha"]
    lines = [json.dumps({"text": t, "id": i}) for i, t in enumerate(["one", "two"])]
    (tmp_path / "d.jsonl").write_text("\n".join(lines) + "\n")
    assert list(sources.documents("jsonl", str(tmp_path / "d.jsonl"))) == ["one", "two"]
    pq.write_table(pa.table({"body": ["x", "yz"]}), tmp_path / "t.parquet")
    assert list(sources.documents("parquet", str(tmp_path), "body")) == ["x", "yz"]


def test_stdlib_source_is_the_standard_library():
    files = sources.stdlib_files()
    assert len(files) > 500
    assert any(f.endswith("/json/decoder.py") for f in files)
    assert not any("site-packages" in f for f in files)


def batches(ds, n):
    it = iter(ds)
    return [next(it) for _ in range(n)]


def test_pipeline_is_seeded_sharded_and_resumes_exactly(tmp_path):
    config = small_config(tmp_path)
    rows, tokenizer = pipeline.row_datasets(typed(config).data, config.data.seq_len)
    assert tokenizer == "byte"
    first = batches(pipeline.train_batches(rows["train"], 4, seed=0), 3)
    again = batches(pipeline.train_batches(rows["train"], 4, seed=0), 3)
    other = batches(pipeline.train_batches(rows["train"], 4, seed=1), 3)
    assert all(np.array_equal(a["inputs"], b["inputs"]) for a, b in zip(first, again, strict=True))
    assert not np.array_equal(first[0]["inputs"], other[0]["inputs"])
    assert first[0]["inputs"].shape == (4, 64)

    # Two processes' shares are disjoint.
    share = [batches(pipeline.train_batches(rows["train"], 2, 0, s, 2), 4) for s in (0, 1)]
    seen = [{b["inputs"][i].tobytes() for b in part for i in range(2)} for part in share]
    assert not seen[0] & seen[1]

    # The iterator state restores the exact next batch.
    it = iter(pipeline.train_batches(rows["train"], 4, seed=0))
    next(it)
    state = it.get_state()
    expected = next(it)
    resumed = iter(pipeline.train_batches(rows["train"], 4, seed=0))
    resumed.set_state(state)
    assert np.array_equal(next(resumed)["inputs"], expected["inputs"])


def test_prepare_writes_arrayrecord_that_reads_back_the_same_rows(tmp_path):
    config = small_config(tmp_path)
    meta = prepare(typed(config).data, str(tmp_path / "packed"))
    in_memory, _ = pipeline.row_datasets(typed(config).data, config.data.seq_len)
    config.data.source, config.data.path = "arrayrecord", str(tmp_path / "packed")
    on_disk, tokenizer = pipeline.row_datasets(typed(config).data, config.data.seq_len)
    assert tokenizer == "byte" and meta["rows"]["train"] == len(on_disk["train"])
    for split in ("train", "eval"):
        assert len(on_disk[split]) == len(in_memory[split])
        for i in (0, len(on_disk[split]) - 1):
            for a, b in zip(on_disk[split][i], in_memory[split][i], strict=True):
                assert np.array_equal(a, b)
