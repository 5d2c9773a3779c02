"""Batches that fit the mesh: generation pads its rows to a multiple of the devices that split
the batch (the "batch" rule's mesh axes), then drops the padding rows from what it returns.

Without this a batch that does not divide the token axes could only run replicated: every
device holding every row and the whole cache, and the MoE on its plain path: at V2 scale an
out-of-memory with no warning (issue 13).
"""

from __future__ import annotations

import functools

import numpy as np
from jax.sharding import Mesh

from deepseek_jax.parallel import rules


def rows_needed(mesh: Mesh | None, batch: int) -> int:
    """The batch rounded up to a multiple of the mesh's token-axis devices."""
    if mesh is None:
        return batch
    split = rules.token_devices(mesh)
    return -(-batch // split) * split


def pad_rows(
    mesh: Mesh | None, tokens_BP: np.ndarray, lengths_B: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded prompts [B, P] and lengths [B] -> [B', P], [B'] with B' = rows_needed:
    the extra rows repeat row 0 (a valid prompt, so nothing downstream special-cases them)."""
    b = len(lengths_B)
    extra = rows_needed(mesh, b) - b
    if not extra:
        return tokens_BP, lengths_B
    tokens_BP = np.concatenate([tokens_BP, np.repeat(tokens_BP[:1], extra, axis=0)])
    return tokens_BP, np.concatenate([lengths_B, np.repeat(lengths_B[:1], extra)])


@functools.cache
def trimmed(stream, batch: int):
    """stream(step, tokens_B) seeing only the first `batch` rows: one function per (stream,
    batch), so that passing the same stream again does not recompile."""
    if stream is None:
        return None
    return lambda step, tokens_B: stream(step, tokens_B[:batch])
