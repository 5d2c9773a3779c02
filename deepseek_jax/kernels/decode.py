"""Absorbed MLA decode over the latent cache: a Pallas TPU kernel beside the model's plain path.

Legend: B batch, H heads, S cache slots, C kv latent (r_kv), R rope dim, L = C + R cached
numbers per token.

    o_B1HC = latent_decode(cfg.kernels, q_latent_B1HC, q_rope_B1HR, cache_BSL, lengths_B, scale,
                           plain)

One query per row (the decode step; the model's T = 1 axis is kept at this interface): with W_UK folded into the query (paper 2.1.2), the
scores are q_latent . c_KV + q_rope . k_R = [q_latent | q_rope] . [c_KV | k_R], one product
with the cached row as it lies, and the output is the probability-weighted sum of c_KV (W_UV
is folded into the output projection by the caller). Row b sees slots [0, lengths[b]).

The kernel streams the cache in blocks of S with an online softmax (Flash-Decoding's
recurrence): grid (B, S / block), the block axis a reduction. Each row's length is prefetched
into scalar memory, and blocks past it are neither computed nor fetched (their block index
repeats the row's last live block, so the pipeline issues no copy). Reading the cache once is
the whole cost at decode: this is the step that should run at the HBM roofline.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.sharding import Mesh

from deepseek_jax.kernels.select import by_platform, per_shard

NEG_INF = -1e30  # finite, as in the plain path: exp(-inf - -inf) would be NaN
LANES = 128


def cache_block(s: int) -> int | None:
    """Slots per kernel step: the largest of 512, 256, 128 dividing S (None: none does)."""
    return next((b for b in (512, 256, LANES) if s % b == 0), None)


def _kernel(lengths_ref, q_ref, cache_ref, o_ref, m_ref, l_ref, acc_ref, *, scale, block):
    b, j = pl.program_id(0), pl.program_id(1)
    length = lengths_ref[b]

    @pl.when(j == 0)
    def _init():
        m_ref[...] = jnp.full(m_ref.shape, NEG_INF, jnp.float32)
        l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    @pl.when(j * block < length)
    def _step():
        q_HL = q_ref[...]
        cache_SL = cache_ref[...]
        s_HS = jax.lax.dot_general(
            q_HL, cache_SL, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32
        )
        s_HS = s_HS * scale
        slot_HS = j * block + jax.lax.broadcasted_iota(jnp.int32, s_HS.shape, 1)
        s_HS = jnp.where(slot_HS < length, s_HS, NEG_INF)
        m_prev = m_ref[...]  # [H, LANES], every lane the same
        m_next = jnp.maximum(m_prev, jnp.max(s_HS, axis=1, keepdims=True))
        p_HS = jnp.exp(s_HS - m_next[:, :1])
        alpha = jnp.exp(m_prev - m_next)
        l_ref[...] = alpha * l_ref[...] + jnp.sum(p_HS, axis=1, keepdims=True)
        m_ref[...] = m_next
        pv_HL = jax.lax.dot_general(
            p_HS.astype(cache_SL.dtype),
            cache_SL,
            (((1,), (0,)), ((), ())),
            preferred_element_type=jnp.float32,
        )
        acc_ref[...] = alpha[:, :1] * acc_ref[...] + pv_HL

    @pl.when(j == pl.num_programs(1) - 1)
    def _write():
        o_ref[...] = (acc_ref[...] / l_ref[...][:, :1]).astype(o_ref.dtype)


def pallas_latent_decode(q_BHL, cache_BSL, lengths_B, *, scale: float, interpret: bool):
    """softmax(scale * q . cache over slots < length) . cache: [B, H, L] (lengths >= 1)."""
    b, h, l = q_BHL.shape
    s = cache_BSL.shape[1]
    block = cache_block(s)

    def cache_index(row, j, lengths_ref):
        # lax.div truncates; `//` would lower a sign() that Mosaic only lowers on a real TPU
        last_live = jax.lax.div(jnp.maximum(lengths_ref[row] - 1, 0), block)
        return row, jnp.minimum(j, last_live), 0

    grid = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=1,
        grid=(b, s // block),
        in_specs=[
            pl.BlockSpec((None, h, l), lambda row, j, lengths_ref: (row, 0, 0)),
            pl.BlockSpec((None, block, l), cache_index),
        ],
        out_specs=pl.BlockSpec((None, h, l), lambda row, j, lengths_ref: (row, 0, 0)),
        scratch_shapes=[
            pltpu.VMEM((h, LANES), jnp.float32),
            pltpu.VMEM((h, LANES), jnp.float32),
            pltpu.VMEM((h, l), jnp.float32),
        ],
    )
    return pl.pallas_call(
        functools.partial(_kernel, scale=scale, block=block),
        grid_spec=grid,
        out_shape=jax.ShapeDtypeStruct((b, h, l), q_BHL.dtype),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary")),
        interpret=interpret,
        name="mla_latent_decode",
    )(lengths_B.astype(jnp.int32), q_BHL, cache_BSL)


def latent_decode(
    kernels: str,
    q_latent_B1HC: jnp.ndarray,
    q_rope_B1HR: jnp.ndarray,
    cache_BSL: jnp.ndarray,
    lengths_B: jnp.ndarray,
    scale: float,
    plain: Callable,
    mesh: Mesh | None = None,
) -> jnp.ndarray:
    """o_latent [B, 1, H, C]: `plain(q_latent, q_rope, cache, lengths)` or the kernel `kernels`
    picks (select.py). With a mesh the kernel runs per shard: rows over the token axes, heads
    over "tensor"."""
    c = q_latent_B1HC.shape[-1]
    args = (q_latent_B1HC, q_rope_B1HR, cache_BSL, lengths_B)

    def tpu_kernel(interpret: bool):
        if cache_block(cache_BSL.shape[1]) is None:
            return f"a cache of {cache_BSL.shape[1]} slots (it needs a multiple of {LANES})"

        def run(q_latent, q_rope, cache, lengths):
            q_BHL = jnp.concatenate([q_latent, q_rope], axis=-1)[:, 0].astype(cache.dtype)
            o_BHL = pallas_latent_decode(q_BHL, cache, lengths, scale=scale, interpret=interpret)
            # The rope columns of the weighted sum are not part of the output: dropping them
            # here costs R / L of the second product, and saves an unaligned slice in-kernel.
            return o_BHL[:, None, :, :c].astype(q_latent.dtype)

        query = ("batch", None, "act_heads", None)
        logical = (query, query, ("batch", None, None), ("batch",))
        return per_shard(mesh, run, args, logical, query)

    return by_platform(
        kernels, "latent_decode", args, plain, tpu=tpu_kernel(False), interpret=tpu_kernel(True)
    )
