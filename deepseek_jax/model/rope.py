"""Rotary position embedding with DeepSeek-V2's YaRN extension (paper 2.1.3, appendix; YaRN).

Layout: the published weights produce q_pe / k_pe whose rotary pairs are interleaved,
(x[2i], x[2i+1]) with frequency i. We rotate those pairs in place rather than permuting the
rope rows at conversion, so a cached k_pe has the same layout as the PyTorch model's.

Legend: B batch, T positions, H heads, R rope dim (dr), F = R/2 frequencies.
"""

from __future__ import annotations

import math

import jax.numpy as jnp

from deepseek_jax.config import ModelConfig


def yarn_mscale(factor: float, mscale: float) -> float:
    """YaRN's attention temperature: 0.1 * m * ln(s) + 1 for s > 1, else 1."""
    if factor <= 1.0:
        return 1.0
    return 0.1 * mscale * math.log(factor) + 1.0


def inv_frequencies(cfg: ModelConfig) -> jnp.ndarray:
    """[F] float32 inverse frequencies, YaRN-blended when cfg.rope_scaling is set."""
    dim = cfg.qk_rope_head_dim
    exponents = jnp.arange(0, dim, 2, dtype=jnp.float32) / dim
    extrapolated = 1.0 / (cfg.rope_theta**exponents)  # F
    yarn = cfg.rope_scaling
    if yarn is None:
        return extrapolated
    interpolated = extrapolated / yarn.factor

    # Frequencies that complete more than beta_fast turns over the original context keep
    # their rotation; fewer than beta_slow turns are interpolated; a linear ramp in between.
    def correction_dim(turns: float) -> float:
        wavelength_ratio = yarn.original_max_position_embeddings / (turns * 2 * math.pi)
        return dim * math.log(wavelength_ratio) / (2 * math.log(cfg.rope_theta))

    low = max(math.floor(correction_dim(yarn.beta_fast)), 0)
    high = min(math.ceil(correction_dim(yarn.beta_slow)), dim - 1)
    if low == high:
        high += 0.001  # the reference's guard against a zero-width ramp
    ramp = jnp.clip((jnp.arange(dim // 2, dtype=jnp.float32) - low) / (high - low), 0.0, 1.0)
    keep_extrapolated = 1.0 - ramp
    return interpolated * ramp + extrapolated * keep_extrapolated


def rope_cos_sin(cfg: ModelConfig, positions_BT: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """cos, sin of shape [B, T, F] for integer positions, scaled by YaRN's mscale ratio."""
    angles_BTF = positions_BT[..., None].astype(jnp.float32) * inv_frequencies(cfg)
    scale = 1.0
    if cfg.rope_scaling is not None:
        yarn = cfg.rope_scaling
        scale = yarn_mscale(yarn.factor, yarn.mscale) / yarn_mscale(
            yarn.factor, yarn.mscale_all_dim
        )
    return jnp.cos(angles_BTF) * scale, jnp.sin(angles_BTF) * scale


def apply_rope(x: jnp.ndarray, cos_BTF: jnp.ndarray, sin_BTF: jnp.ndarray) -> jnp.ndarray:
    """Rotates interleaved pairs of x [B, T, (H,) R]; cos/sin [B, T, F] broadcast over heads."""
    if x.ndim == 4:
        cos_BTF, sin_BTF = cos_BTF[:, :, None], sin_BTF[:, :, None]
    pairs = x.astype(jnp.float32).reshape(*x.shape[:-1], -1, 2)
    even, odd = pairs[..., 0], pairs[..., 1]
    rotated = jnp.stack([even * cos_BTF - odd * sin_BTF, even * sin_BTF + odd * cos_BTF], axis=-1)
    return rotated.reshape(x.shape).astype(x.dtype)


def softmax_scale(cfg: ModelConfig) -> float:
    """(dn + dr)^-0.5, times mscale(factor, mscale_all_dim)^2 under YaRN (docs/design.md 1)."""
    scale = cfg.qk_head_dim**-0.5
    if cfg.rope_scaling is not None:
        scale *= yarn_mscale(cfg.rope_scaling.factor, cfg.rope_scaling.mscale_all_dim) ** 2
    return scale
