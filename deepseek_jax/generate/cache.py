"""The MLA latent KV cache: [c_KV | k_R] per token per layer, and what it costs.

Legend: L layers, B batch, S cache slots (slot index == position), C + R latent width.

The cache is the dict `deepseek_jax.init_cache` makes, {"dense": [L_dense, B, S, C+R],
"moe": [L_moe, B, S, C+R]}; prefill writes a full forward's latents into its first slots and
each decode step writes one slot per row. A conventional per-head cache would hold
H * (dn + dr + dv) numbers per token per layer instead of C + R (docs/design.md 1).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from deepseek_jax.config import ModelConfig, resolve_dtype


def write_prefix(cache: dict, latents: dict) -> dict:
    """Copies a prefill's latents {key: [L, B, T, C+R]} into slots 0..T-1 of `cache`."""
    return {
        key: jax.lax.dynamic_update_slice(
            slots, latents[key].astype(slots.dtype), (0,) * slots.ndim
        )
        for key, slots in cache.items()
    }


def nbytes(cache: dict) -> int:
    """Bytes the cache arrays hold."""
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(cache))


def latent_bytes_per_token(cfg: ModelConfig, dtype=None) -> int:
    """Bytes one token occupies in our cache, over all layers: L * (C + R) numbers."""
    itemsize = jnp.dtype(dtype or resolve_dtype(cfg).dtype).itemsize
    return cfg.num_hidden_layers * cfg.latent_cache_dim * itemsize


def expanded_bytes_per_token(cfg: ModelConfig, dtype=None) -> int:
    """Bytes one token would occupy in a per-head K/V cache: L * H * (dn + dr + dv) numbers."""
    itemsize = jnp.dtype(dtype or resolve_dtype(cfg).dtype).itemsize
    return cfg.num_hidden_layers * cfg.expanded_cache_dim * itemsize


def describe(cfg: ModelConfig, batch: int, slots: int, dtype=None) -> str:
    """One line: this run's cache size, per token, and what a per-head K/V cache would take."""
    per_token = latent_bytes_per_token(cfg, dtype)
    expanded = expanded_bytes_per_token(cfg, dtype)
    return (
        f"latent KV cache {batch * slots * per_token / 2**20:.2f} MiB for {batch}x{slots} slots:"
        f" {per_token:,} bytes/token ({cfg.num_hidden_layers} layers x {cfg.latent_cache_dim}"
        f" numbers); a per-head K/V cache would take {expanded:,} ({expanded / per_token:.1f}x)"
    )
