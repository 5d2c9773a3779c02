"""Text sources: each yields documents (one str per document) in a fixed, sorted order.

    stdlib                  the running Python's standard library sources (via sysconfig)
    text  PATH             a folder (every file below it) or a glob of text files, one doc each
    jsonl PATH             one JSON object a line; the document is its `text_field`
    parquet PATH           a file, folder or glob of .parquet files; the column `text_field`

A fixed order makes the packed rows, the held-out split and hence every run reproducible.
"""

from __future__ import annotations

import glob
import json
import os
import sysconfig
from collections.abc import Iterator

from deepseek_jax.errors import UserError

TEXT_SOURCES = ("stdlib", "text", "jsonl", "parquet")


def expand(path: str, suffix: str = "") -> list[str]:
    """A file, a folder (searched recursively for `suffix`) or a glob -> sorted file paths."""
    if os.path.isdir(path):
        pattern = os.path.join(path, "**", f"*{suffix}")
        files = glob.glob(pattern, recursive=True)
    else:
        files = glob.glob(path, recursive=True)
    files = sorted(f for f in files if os.path.isfile(f))
    if not files:
        raise FileNotFoundError(f"no files match {path!r}: give a folder, a file or a glob")
    return files


def stdlib_files() -> list[str]:
    """The standard library's own .py files (third-party site-packages excluded)."""
    root = sysconfig.get_paths()["stdlib"]
    files = glob.glob(os.path.join(root, "**", "*.py"), recursive=True)
    return sorted(f for f in files if "site-packages" not in f and "dist-packages" not in f)


def read_files(files: list[str]) -> Iterator[str]:
    for name in files:
        # Some stdlib test files are deliberately not UTF-8; keep them rather than fail.
        with open(name, encoding="utf-8", errors="replace") as f:
            yield f.read()


def read_jsonl(files: list[str], field: str) -> Iterator[str]:
    for name in files:
        with open(name, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                record = json.loads(line)
                if field not in record:
                    raise KeyError(
                        f"{name}:{number} has no field {field!r} (fields: {sorted(record)}); "
                        "set --config.data.text_field"
                    )
                yield record[field]


def read_parquet(files: list[str], field: str) -> Iterator[str]:
    import pyarrow.parquet as pq  # noqa: PLC0415  (optional dependency, only for parquet)

    for name in files:
        parquet = pq.ParquetFile(name)
        if field not in parquet.schema_arrow.names:
            raise KeyError(
                f"{name} has no column {field!r} (columns: {parquet.schema_arrow.names}); "
                "set --config.data.text_field"
            )
        for batch in parquet.iter_batches(columns=[field]):
            yield from batch.column(0).to_pylist()


def documents(source: str, path: str = "", text_field: str = "text") -> Iterator[str]:
    """The documents of one source kind (see the module docstring)."""
    if source not in TEXT_SOURCES:  # checked first: an unknown source is the mistake to name
        raise UserError(
            f"data.source={source!r}: choose one of {TEXT_SOURCES}, 'arrayrecord' (see prepare) "
            "or 'chat' (SFT)"
        )
    if source == "stdlib":
        return read_files(stdlib_files())
    if not path:
        raise UserError(f"data.source={source!r} needs data.path (a file, folder or glob)")
    if source == "text":
        return read_files(expand(path))
    if source == "jsonl":
        return read_jsonl(expand(path, ".jsonl"), text_field)
    return read_parquet(expand(path, ".parquet"), text_field)
