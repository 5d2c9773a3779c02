"""Small building blocks: RMSNorm, the SwiGLU feed-forward, and annotated parameters.

Every parameter carries logical axis names (`nn.with_logical_partitioning`); the one table in
`deepseek_jax/parallel/` maps them onto a mesh. Outside a mesh they are plain arrays.

Legend: B batch, T positions, D model width, I feed-forward width.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from deepseek_jax.config import ModelConfig


def weight(
    module: nn.Module, name: str, cfg: ModelConfig, shape: Sequence[int], axes: Sequence[str]
) -> jnp.ndarray:
    """A matrix parameter: normal(0, initializer_range), logical axes `axes`, compute dtype."""
    init = nn.with_logical_partitioning(
        nn.initializers.normal(stddev=cfg.initializer_range), tuple(axes)
    )
    w = module.param(name, init, tuple(shape), jnp.dtype(cfg.param_dtype))
    return w.astype(cfg.dtype)


class RMSNorm(nn.Module):
    """x / rms(x) * scale, computed in float32 and cast back before the scale (as published)."""

    cfg: ModelConfig
    axis_name: str = "embed"

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        init = nn.with_logical_partitioning(nn.initializers.ones, (self.axis_name,))
        scale = self.param("scale", init, (x.shape[-1],), jnp.dtype(self.cfg.param_dtype))
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(
            jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.cfg.rms_norm_eps
        )
        return scale.astype(self.cfg.dtype) * normed.astype(self.cfg.dtype)


def swiglu(x, w_gate, w_up, w_down):
    """down(silu(x W_gate) * x W_up): the FFN of dense layers, shared and routed experts."""
    h = jax.nn.silu(x @ w_gate) * (x @ w_up)
    return h @ w_down


def tile_rows(assignments: int, experts: int) -> int:
    """Rows per grouped-matmul tile: about half an expert's average load, a power of two.

    Each tile copies its expert's weights, so small tiles cost weight traffic (64-row tiles
    made the `small` MoE layer 2-2.6x slower than 256-row ones, measured); padding costs at
    most experts * (tile - 1) rows, so tiles much above the average load waste compute.
    """
    target = max(assignments // (2 * experts), 8)
    return min(1 << (target.bit_length() - 1), 256)


def grouped_swiglu(x_RD, expert_RK, gate_RK, w_gate_EDI, w_up_EDI, w_down_EID):
    """sum_k gate[r, k] * expert_{expert[r, k]}(x[r]), [R, D]; expert id E marks an empty slot.

    Dropless, as a tiled grouped matmul: the R*K assignments are sorted by expert and each
    expert's run padded to whole tiles, so every tile belongs to one expert; then one batched
    SwiGLU over tiles. On the CPU this beats `lax.ragged_dot`, which lowers to a dense masked
    dot (docs/design.md 7).
    """
    r, d = x_RD.shape
    e = w_gate_EDI.shape[0]
    a = expert_RK.size
    tile = tile_rows(a, e)
    order = jnp.argsort(expert_RK.reshape(-1), stable=True)
    expert_A = expert_RK.reshape(-1)[order]
    row_A = jnp.repeat(jnp.arange(r), expert_RK.shape[1])[order]
    gate_A = gate_RK.reshape(-1)[order]

    sizes_E = jnp.bincount(expert_A, length=e)  # empty slots (id E) are not counted
    padded_E = (sizes_E + tile - 1) // tile * tile
    padded_end_E = jnp.cumsum(padded_E)
    expert_c = jnp.minimum(expert_A, e - 1)
    rank_A = jnp.arange(a) - (jnp.cumsum(sizes_E) - sizes_E)[expert_c]
    slot_A = jnp.where(expert_A < e, padded_end_E[expert_c] - padded_E[expert_c] + rank_A, -1)

    tiles = (a + e * (tile - 1) + tile - 1) // tile
    expert_of_tile = jnp.clip(
        jnp.searchsorted(padded_end_E, jnp.arange(tiles) * tile, side="right"), 0, e - 1
    )
    x_rows = jnp.zeros((tiles * tile, d), x_RD.dtype).at[slot_A].set(x_RD[row_A], mode="drop")
    with jax.named_scope("experts"):
        y_tiles = swiglu(
            x_rows.reshape(tiles, tile, d),
            w_gate_EDI[expert_of_tile],
            w_up_EDI[expert_of_tile],
            w_down_EID[expert_of_tile],
        )
    y_A = y_tiles.reshape(-1, d).at[slot_A].get(mode="fill", fill_value=0)
    y_A = y_A * gate_A[:, None].astype(y_A.dtype)
    return jnp.zeros((r, d), y_A.dtype).at[row_A].add(y_A)


class MLP(nn.Module):
    """Dense SwiGLU of width `width`: x [..., D] -> [..., D]."""

    cfg: ModelConfig
    width: int

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        d = self.cfg.hidden_size
        w_gate = weight(self, "w_gate", self.cfg, (d, self.width), ("embed", "mlp"))
        w_up = weight(self, "w_up", self.cfg, (d, self.width), ("embed", "mlp"))
        w_down = weight(self, "w_down", self.cfg, (self.width, d), ("mlp", "embed"))
        return swiglu(x, w_gate, w_up, w_down)
