"""Attention that never writes out [B, H, T, S]: a plain reference and a blockwise online softmax.

Legend: B batch, T queries, S keys, H query heads, G key/value heads (H, or 1 for keys shared
by every head: MLA's absorbed decode reads its latent cache this way), K query/key dim,
V value dim, Q a block of bq queries, J a block of bk keys.

Visibility, the one rule every path follows: key s (keys sit at index == position) is visible
to query t iff s <= q_positions[b, t] (causal), and, when `segment_ids` [B, T] are given
(self-attention over packed documents, S == T), iff both carry the same segment id.

    o_BTHV = attend(q_BTHK, k_BSGK, v_BSGV, scale=..., q_positions_BT=..., block=512)

`reference_attention` is the plain path: scores [B, H, T, S], a float32 softmax, one einsum.
`blockwise_attention` is the same function computed as FlashAttention does (Dao et al. 2022,
arXiv 2205.14135; online softmax of Milakov & Gimelshein 2018): queries in blocks of bq, and
for each, a running max m, normaliser l and output over key blocks of bk, so at most
[B, H, bq, bk] scores exist at a time. Its backward (a custom VJP) keeps only the output and
the log-sum-exp per query and recomputes each block's scores, so training never stores T x S
either. Key blocks that lie wholly after a query block's last position are skipped (`lax.cond`):
half the blocks of a causal prefill, and the unwritten tail of a decode cache.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from deepseek_jax.errors import UserError

NEG_INF = -1e30  # finite, so a fully masked row (padding) gives a uniform softmax, not NaN

# Keys per block when the config leaves it unset; sequences up to one block keep the plain
# path. On the CPU, blocks already beat the plain path at 512 and 1024 tokens of `tiny`
# (bench/long_context.py --ab, interleaved on a shared machine: README, long context).
DEFAULT_BLOCK = {"cpu": 512, "gpu": 512, "tpu": 512}


def default_block() -> int:
    """The key block size for the platform jax runs on."""
    return DEFAULT_BLOCK.get(jax.default_backend(), 512)


def visible(q_positions_BT, k_index_S, segment_ids_BT=None, k_segments_BS=None) -> jnp.ndarray:
    """[B, T, S] booleans: key k_index[s] is visible to query t (the rule in the module doc)."""
    mask_BTS = k_index_S[None, None, :] <= q_positions_BT[:, :, None]
    if segment_ids_BT is not None:
        mask_BTS &= segment_ids_BT[:, :, None] == k_segments_BS[:, None, :]
    return mask_BTS


def _heads(kv_BSGX) -> str:
    """The einsum letter of the key/value head axis: "" when one head is shared by all."""
    return "" if kv_BSGX.shape[2] == 1 else "H"


def _einsum_f32(spec: str, a, b) -> jnp.ndarray:
    """einsum with float32 results. XLA:CPU has no bf16 x bf16 -> f32 dot (its DotThunk
    refuses it), so on the CPU the operands are upcast instead (no bf16 hardware there)."""
    if jax.default_backend() == "cpu":
        return jnp.einsum(spec, a.astype(jnp.float32), b.astype(jnp.float32))
    return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)


def _scores(q_BQHK, k_BJGK) -> jnp.ndarray:
    """[B, H, Q, J] float32 dot products; a shared key head broadcasts over the query heads."""
    h = _heads(k_BJGK)
    k = k_BJGK if h else k_BJGK[:, :, 0]
    return _einsum_f32(f"BQHK,BJ{h}K->BHQJ", q_BQHK, k)


def _weighted(p_BHQJ, v_BJGV) -> jnp.ndarray:
    """[B, Q, H, V] float32: probabilities times values."""
    if _heads(v_BJGV):
        return _einsum_f32("BHQJ,BJHV->BQHV", p_BHQJ.astype(v_BJGV.dtype), v_BJGV)
    # A value head shared by every query head (MLA's absorbed decode): one batched matmul
    # [H Q, J] x [J, V] a row, probabilities on the left. From the einsum, XLA:CPU put the
    # values on the left, contracted on their major axis, in an Eigen dot at ~13 GFLOP/s:
    # `small`'s generation at batch 8 (160 new tokens) took 5.88 s, now 5.37 s (medians of 6
    # runs alternated on a shared 2-core CPU). The scores' einsum is left as it is: written
    # as the same kind of matmul it ran slower there.
    b, h, q, j = p_BHQJ.shape
    p_BMJ = p_BHQJ.astype(v_BJGV.dtype).reshape(b, h * q, j)  # M = H Q
    o_BMV = _einsum_f32("BMJ,BJV->BMV", p_BMJ, v_BJGV[:, :, 0])
    return jnp.einsum("BHQV->BQHV", o_BMV.reshape(b, h, q, -1))


def reference_attention(
    q_BTHK, k_BSGK, v_BSGV, *, scale: float, q_positions_BT, segment_ids_BT=None
) -> jnp.ndarray:
    """The plain path: all [B, H, T, S] scores at once. Returns o [B, T, H, V]."""
    mask_BTS = visible(q_positions_BT, jnp.arange(k_BSGK.shape[1]), segment_ids_BT, segment_ids_BT)
    scores_BHTS = jnp.where(mask_BTS[:, None], _scores(q_BTHK, k_BSGK) * scale, NEG_INF)
    probs_BHTS = jax.nn.softmax(scores_BHTS, axis=-1)
    return _weighted(probs_BHTS, v_BSGV).astype(v_BSGV.dtype)


def _blocks(x, size: int):
    """[B, T, ...] -> [T / size, B, size, ...]: the leading axis is what lax.map walks."""
    return jnp.moveaxis(x.reshape(x.shape[0], -1, size, *x.shape[2:]), 1, 0)


def _unblocks(x):
    """[n, B, size, ...] -> [B, n * size, ...]."""
    x = jnp.moveaxis(x, 0, 1)
    return x.reshape(x.shape[0], -1, *x.shape[3:])


def _key_block(j, bk: int, k_BSGK, v_BSGV, segment_ids_BT):
    """Key block j: its keys, values, indices [J] and segment ids [B, J] (or None)."""
    start = j * bk
    k_j = jax.lax.dynamic_slice_in_dim(k_BSGK, start, bk, axis=1)
    v_j = jax.lax.dynamic_slice_in_dim(v_BSGV, start, bk, axis=1)
    seg_j = None
    if segment_ids_BT is not None:
        seg_j = jax.lax.dynamic_slice_in_dim(segment_ids_BT, start, bk, axis=1)
    return k_j, v_j, start + jnp.arange(bk), seg_j


def _masked_scores(q_i, k_j, pos_i, index_j, seg_i, seg_j, scale):
    """[B, H, Q, J] scaled float32 scores of one block pair, NEG_INF where not visible."""
    mask_BQJ = visible(pos_i, index_j, seg_i, seg_j)
    return jnp.where(mask_BQJ[:, None], _scores(q_i, k_j) * scale, NEG_INF)


def _forward(q_BTHK, k_BSGK, v_BSGV, q_positions_BT, segment_ids_BT, scale, bq, bk):
    """Online softmax. Returns o [B, T, H, V] (input dtype) and lse [B, H, T] float32."""
    # Inside an outer scan under grad (the layer stack), JAX's partial evaluation hoists
    # whatever does not vary with the layer (the masks, from positions alone) out of these
    # loops as stacked [n_q, n_k, B, H, bq, bk] residuals: 6 GiB for a 16K-token step,
    # measured. Tying every input to q makes all of it vary with the layer.
    q_BTHK, k_BSGK, v_BSGV, q_positions_BT, segment_ids_BT = jax.lax.optimization_barrier(
        (q_BTHK, k_BSGK, v_BSGV, q_positions_BT, segment_ids_BT)
    )
    b, _, h, _ = q_BTHK.shape
    dv = v_BSGV.shape[-1]
    n_k = k_BSGK.shape[1] // bk
    seg_blocks = None if segment_ids_BT is None else _blocks(segment_ids_BT, bq)

    def one_query_block(args):
        q_i, pos_i, seg_i = args  # [B, Q, H, K], [B, Q], [B, Q]

        def key_step(carry, j):
            def update(carry):
                m_BHQ, l_BHQ, acc_BQHV = carry
                k_j, v_j, index_j, seg_j = _key_block(j, bk, k_BSGK, v_BSGV, segment_ids_BT)
                s_BHQJ = _masked_scores(q_i, k_j, pos_i, index_j, seg_i, seg_j, scale)
                m_new = jnp.maximum(m_BHQ, s_BHQJ.max(axis=-1))
                correction = jnp.exp(m_BHQ - m_new)
                p_BHQJ = jnp.exp(s_BHQJ - m_new[..., None])
                l_new = l_BHQ * correction + p_BHQJ.sum(axis=-1)
                acc_new = acc_BQHV * jnp.einsum("BHQ->BQH", correction)[..., None]
                return m_new, l_new, acc_new + _weighted(p_BHQJ, v_j)

            # Causality: a block whose first key follows every query's position adds nothing.
            reached = j * bk <= pos_i.max()
            return jax.lax.cond(reached, update, lambda c: c, carry), None

        m0 = jnp.full((b, h, q_i.shape[1]), NEG_INF, jnp.float32)
        acc0 = jnp.zeros((b, q_i.shape[1], h, dv), jnp.float32)
        (m, l, acc), _ = jax.lax.scan(key_step, (m0, jnp.zeros_like(m0), acc0), jnp.arange(n_k))
        o_BQHV = acc / jnp.einsum("BHQ->BQH", l)[..., None]
        return o_BQHV.astype(v_BSGV.dtype), m + jnp.log(l)

    o, lse = jax.lax.map(
        one_query_block, (_blocks(q_BTHK, bq), _blocks(q_positions_BT, bq), seg_blocks)
    )
    return _unblocks(o), jnp.moveaxis(_unblocks(jnp.moveaxis(lse, 3, 2)), 1, 2)


def _probs_and_ds(q_i, k_j, v_j, do_i, pos_i, index_j, seg_i, seg_j, lse_i, delta_i, scale):
    """One block pair of the backward: p [B, H, Q, J] and dL/ds [B, H, Q, J] (scale folded in).

    p = exp(s - lse) recomputes the forward's probabilities; ds = p * (dp - delta) with
    dp = dO . V and delta = rowsum(dO * O), the softmax backward (FlashAttention, algorithm 4).
    """
    s_BHQJ = _masked_scores(q_i, k_j, pos_i, index_j, seg_i, seg_j, scale)
    p_BHQJ = jnp.exp(s_BHQJ - lse_i[..., None])
    h = _heads(v_j)
    v = v_j if h else v_j[:, :, 0]
    dp_BHQJ = _einsum_f32(f"BQHV,BJ{h}V->BHQJ", do_i, v)
    return p_BHQJ, p_BHQJ * (dp_BHQJ - delta_i[..., None]) * scale


def _backward(scale, bq, bk, residuals, do_BTHV):
    residuals = jax.lax.optimization_barrier((*residuals, do_BTHV))  # as in _forward
    q_BTHK, k_BSGK, v_BSGV, q_positions_BT, segment_ids_BT, o_BTHV, lse_BHT, do_BTHV = residuals
    n_q, n_k = q_BTHK.shape[1] // bq, k_BSGK.shape[1] // bk
    h = _heads(k_BSGK)
    do_BTHV = do_BTHV.astype(jnp.float32)
    delta_BHT = jnp.einsum("BTHV,BTHV->BHT", do_BTHV, o_BTHV.astype(jnp.float32))

    def query_block(i):
        start = i * bq
        take = functools.partial(jax.lax.dynamic_slice_in_dim, start_index=start, slice_size=bq)
        seg_i = None if segment_ids_BT is None else take(segment_ids_BT, axis=1)
        return (
            take(q_BTHK, axis=1),
            take(do_BTHV, axis=1),
            take(q_positions_BT, axis=1),
            seg_i,
            take(lse_BHT, axis=2),
            take(delta_BHT, axis=2),
        )

    def dq_of_block(i):  # dq_i = sum over key blocks j of ds_ij . k_j
        q_i, do_i, pos_i, seg_i, lse_i, delta_i = query_block(i)

        def key_step(dq_BQHK, j):
            def update(dq_BQHK):
                k_j, v_j, index_j, seg_j = _key_block(j, bk, k_BSGK, v_BSGV, segment_ids_BT)
                _, ds = _probs_and_ds(
                    q_i, k_j, v_j, do_i, pos_i, index_j, seg_i, seg_j, lse_i, delta_i, scale
                )
                k = k_j if h else k_j[:, :, 0]
                return dq_BQHK + jnp.einsum(f"BHQJ,BJ{h}K->BQHK", ds, k.astype(jnp.float32))

            return jax.lax.cond(j * bk <= pos_i.max(), update, lambda d: d, dq_BQHK), None

        dq0 = jnp.zeros(q_i.shape, jnp.float32)
        return jax.lax.scan(key_step, dq0, jnp.arange(n_k))[0]

    def dkv_of_block(j):  # dk_j = sum over query blocks of ds^T q_i; dv_j = sum of p^T dO_i
        k_j, v_j, index_j, seg_j = _key_block(j, bk, k_BSGK, v_BSGV, segment_ids_BT)

        def query_step(carry, i):
            def update(carry):
                dk_j, dv_j = carry
                q_i, do_i, pos_i, seg_i, lse_i, delta_i = query_block(i)
                p, ds = _probs_and_ds(
                    q_i, k_j, v_j, do_i, pos_i, index_j, seg_i, seg_j, lse_i, delta_i, scale
                )
                dk_j += jnp.einsum(f"BHQJ,BQHK->BJ{h}K", ds, q_i.astype(jnp.float32))
                dv_j += jnp.einsum(f"BHQJ,BQHV->BJ{h}V", p, do_i)
                return dk_j, dv_j

            _, _, pos_i, *_ = query_block(i)
            return jax.lax.cond(j * bk <= pos_i.max(), update, lambda c: c, carry), None

        zeros = (
            jnp.zeros(k_j.shape if h else k_j[:, :, 0].shape, jnp.float32),
            jnp.zeros(v_j.shape if h else v_j[:, :, 0].shape, jnp.float32),
        )
        dk_j, dv_j = jax.lax.scan(query_step, zeros, jnp.arange(n_q))[0]
        return (dk_j, dv_j) if h else (dk_j[:, :, None], dv_j[:, :, None])

    dq = _unblocks(jax.lax.map(dq_of_block, jnp.arange(n_q)))
    dk, dv = jax.lax.map(dkv_of_block, jnp.arange(n_k))
    return (
        dq.astype(q_BTHK.dtype),
        _unblocks(dk).astype(k_BSGK.dtype),
        _unblocks(dv).astype(v_BSGV.dtype),
        None,
        None,
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _blockwise(q_BTHK, k_BSGK, v_BSGV, q_positions_BT, segment_ids_BT, scale, bq, bk):
    return _forward(q_BTHK, k_BSGK, v_BSGV, q_positions_BT, segment_ids_BT, scale, bq, bk)[0]


def _blockwise_fwd(q_BTHK, k_BSGK, v_BSGV, q_positions_BT, segment_ids_BT, scale, bq, bk):
    o, lse = _forward(q_BTHK, k_BSGK, v_BSGV, q_positions_BT, segment_ids_BT, scale, bq, bk)
    return o, (q_BTHK, k_BSGK, v_BSGV, q_positions_BT, segment_ids_BT, o, lse)


_blockwise.defvjp(_blockwise_fwd, _backward)


def blockwise_attention(
    q_BTHK,
    k_BSGK,
    v_BSGV,
    *,
    block_q: int,
    block_k: int,
    scale: float,
    q_positions_BT,
    segment_ids_BT=None,
) -> jnp.ndarray:
    """Online-softmax attention in [block_q x block_k] tiles; equal to `reference_attention`.

    q [B, T, H, K], k [B, S, G, K], v [B, S, G, V] with G = H or 1; q_positions [B, T] int;
    segment_ids [B, T] int or None (then S == T). T must be a multiple of block_q and S of
    block_k. Returns o [B, T, H, V]. Differentiable in q, k, v with O(T + S) saved memory.
    """
    t, s = q_BTHK.shape[1], k_BSGK.shape[1]
    for name, length, block in (("query", t, block_q), ("key", s, block_k)):
        if block <= 0 or length % block:
            raise UserError(
                f"attention block size {block} does not divide the padded {name} length "
                f"{length}: pad the sequence to a multiple of {block} or set "
                "attention_block_size to a divisor of it"
            )
    if segment_ids_BT is not None and s != t:
        raise ValueError(f"segment_ids need self-attention (S == T), got T={t}, S={s}")
    q_positions_BT = q_positions_BT.astype(jnp.int32)
    return _blockwise(
        q_BTHK, k_BSGK, v_BSGV, q_positions_BT, segment_ids_BT, scale, block_q, block_k
    )


def _pad(x, length: int, value=0):
    """Right-pads axis 1 of x to `length` with `value`."""
    pad = [(0, 0)] * x.ndim
    pad[1] = (0, length - x.shape[1])
    return jnp.pad(x, pad, constant_values=value)


def attend(
    q_BTHK,
    k_BSGK,
    v_BSGV,
    *,
    scale: float,
    q_positions_BT,
    segment_ids_BT=None,
    block: int | None = None,
) -> jnp.ndarray:
    """o [B, T, H, V]: the plain path when the keys fit in one block, else the blockwise one.

    `block` (None: `default_block()` for this platform) is both block sizes. Longer
    sequences are right-padded to a multiple of it; padded keys lie after every real
    position and padded queries are dropped, so the result is the same function.
    """
    block = block or default_block()
    t, s = q_BTHK.shape[1], k_BSGK.shape[1]
    if s <= block:
        return reference_attention(
            q_BTHK,
            k_BSGK,
            v_BSGV,
            scale=scale,
            q_positions_BT=q_positions_BT,
            segment_ids_BT=segment_ids_BT,
        )
    block_q = min(block, t)
    padded_t = -(-t // block_q) * block_q
    padded_s = -(-s // block) * block
    if segment_ids_BT is not None:  # self-attention: one padded length for both
        padded_t = padded_s = max(padded_t, padded_s)
        segment_ids_BT = _pad(segment_ids_BT, padded_t, -1)
    o = blockwise_attention(
        _pad(q_BTHK, padded_t),
        _pad(k_BSGK, padded_s),
        _pad(v_BSGV, padded_s),
        scale=scale,
        q_positions_BT=_pad(q_positions_BT, padded_t),
        segment_ids_BT=segment_ids_BT,
        block_q=block_q,
        block_k=block,
    )
    return o[:, :t]
