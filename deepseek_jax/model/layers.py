"""Small building blocks: RMSNorm, the dense SwiGLU feed-forward, and annotated parameters.

Every parameter carries logical axis names (`nn.with_logical_partitioning`); the one table in
`deepseek_jax/parallel/` maps them onto a mesh. Outside a mesh they are plain arrays.

Legend: B batch, T positions, D model width, I feed-forward width.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from deepseek_jax.config import ModelConfig, resolve_dtype
from deepseek_jax.model.experts import swiglu


def weight(
    module: nn.Module, name: str, cfg: ModelConfig, shape: Sequence[int], axes: Sequence[str]
) -> jnp.ndarray:
    """A matrix parameter: normal(0, initializer_range), logical axes `axes`, compute dtype."""
    init = nn.with_logical_partitioning(
        nn.initializers.normal(stddev=cfg.initializer_range), tuple(axes)
    )
    w = module.param(name, init, tuple(shape), jnp.dtype(cfg.param_dtype))
    # A layer used alone resolves dtype "auto" itself; inside the model it is already concrete.
    return w.astype(resolve_dtype(cfg).dtype)


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
        dtype = resolve_dtype(self.cfg).dtype
        return scale.astype(dtype) * normed.astype(dtype)


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
