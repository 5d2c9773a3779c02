"""The routed experts' compute: a grouped matmul over rows sorted by expert (paper 2.2, eq. 20).

Legend: m rows (one per expert assignment, sorted by expert), k input width, n output width,
g groups (experts), D model width, I expert width.

    grouped_matmul(lhs [m, k], rhs [g, k, n], group_sizes [g]) -> [m, n]
    rows off[e] .. off[e] + group_sizes[e] - 1 are multiplied by rhs[e]; rows past
    sum(group_sizes) give zeros.

This is `jax.lax.ragged_dot`'s interface (and megablox `gmm`'s), so a TPU/GPU kernel can stand
behind the same function. The plain implementation here is the one that runs everywhere and
the one the CPU uses: `lax.ragged_dot` lowers to a dense masked dot on XLA:CPU (g times the
work, docs/design.md 7), and gathering each tile's expert weights (the previous implementation)
copied [tiles, D, I] per matrix forward and scatter-added it back in the backward.

Here the work is a loop over fixed-size row tiles, each owned by one expert, multiplying
`tile` rows by its expert's matrix. A dot on XLA:CPU takes whole buffers, so `rhs[e]` is a
copy: the first tile of each expert makes it and the expert's other tiles reuse it from the
loop's carry (one copy per expert and call, not per tile). The loop's trip count is a static
bound (ceil(m / tile) + g: each expert adds at most one partial tile), so the compiled
program states its worst cost; tiles past the ones the groups use are skipped at run time
(`lax.cond`), so the work done is the assignments present plus at most one partial tile per
expert. The backward is the same loop twice (a custom VJP, as megablox's gmm/tgmm): d lhs =
grouped_matmul(d out, rhs^T), and d rhs[e] = lhs_e^T d out_e accumulated tile by tile into
its expert's slot.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from deepseek_jax.kernels.gmm import routed_swiglu


def tile_rows(rows: int, groups: int) -> int:
    """Rows per tile: a power of two near rows / (8 groups), between 8 and 128.

    The loop's static bound pads at most one tile per group, so tile <= rows / (8 groups)
    keeps that bound within 12.5% of the rows (the compiled FLOPs, issue 12 point 4) once
    rows >= 64 x groups, and within 8 x groups rows below that; at run time about half of
    it is done. Tiles under 8 rows starve the CPU's matmul.
    """
    target = max(rows // (8 * groups), 8)
    return min(1 << (target.bit_length() - 1), 128)


def _tile_table(group_sizes_g, tiles: int, tile: int):
    """For each tile slot: (its group, first row, rows of its group from there, used?, the
    first tile of its group?)."""
    ends_g = jnp.cumsum(group_sizes_g)
    starts_g = ends_g - group_sizes_g
    count_g = (group_sizes_g + tile - 1) // tile
    tile_end_g = jnp.cumsum(count_g)
    slot = jnp.arange(tiles)
    group = jnp.minimum(jnp.searchsorted(tile_end_g, slot, side="right"), len(group_sizes_g) - 1)
    used = slot < tile_end_g[-1]
    first = starts_g[group] + (slot - (tile_end_g - count_g)[group]) * tile
    first = jnp.where(used, first, 0)
    valid = jnp.where(used, ends_g[group] - first, 0)  # rows of this tile that are its group's
    opens = used & (slot == (tile_end_g - count_g)[group])
    return group, first, valid, used, opens


def _tile_loop(group_sizes_g, m: int, tile: int, groups: int, out_init, tile_fn):
    """Runs tile_fn(carry, group, first_row, row_mask [tile, 1], opens) over the used tiles,
    in order (a group's tiles are consecutive; `opens` marks the first of them)."""
    tiles = -(-m // tile) + groups
    group_t, first_t, valid_t, used_t, opens_t = _tile_table(group_sizes_g, tiles, tile)
    rows = jnp.arange(tile)[:, None]

    def body(t, carry):
        def run(c):
            return tile_fn(c, group_t[t], first_t[t], rows < valid_t[t], opens_t[t])

        return jax.lax.cond(used_t[t], run, lambda c: c, carry)

    return jax.lax.fori_loop(0, tiles, body, out_init)


def _zeros(shape, dtype, *inputs):
    """Zeros that vary over the mesh axes its inputs vary over: inside shard_map a loop's
    carry must keep one type, and every tile mixes the inputs into it."""
    out = jnp.zeros(shape, dtype)
    for x in inputs:
        out = out + jnp.zeros_like(x, shape=(), dtype=dtype)
    return out


def _pad_rows(x, tile: int):
    """Room for a tile that starts on the last row: dynamic_slice would shift it otherwise."""
    return jnp.pad(x, ((0, tile), (0, 0)))


def _gmm(lhs_mk, rhs_gkn, group_sizes_g, tile: int, transpose_rhs: bool):
    m = lhs_mk.shape[0]
    groups = rhs_gkn.shape[0]
    width = rhs_gkn.shape[1] if transpose_rhs else rhs_gkn.shape[2]
    lhs = _pad_rows(lhs_mk, tile)
    dims = (((1,), (1,)), ((), ())) if transpose_rhs else (((1,), (0,)), ((), ()))

    def tile_fn(carry, group, first, mask, opens):
        out, w_held = carry
        # A dot on XLA:CPU takes whole buffers, so rhs[group] is a copy: the first tile of a
        # group makes it and the group's other tiles reuse it (one copy per expert, not per
        # tile).
        w = jax.lax.cond(
            opens,
            lambda: jax.lax.dynamic_index_in_dim(rhs_gkn, group, keepdims=False),
            lambda: w_held,
        )
        x = jax.lax.dynamic_slice_in_dim(lhs, first, tile)
        y = jax.lax.dot_general(x, w, dims, preferred_element_type=out.dtype)
        old = jax.lax.dynamic_slice_in_dim(out, first, tile)
        # A tile's rows past its group belong to the next group's tiles: keep theirs.
        return jax.lax.dynamic_update_slice_in_dim(out, jnp.where(mask, y, old), first, 0), w

    out = _zeros((m + tile, width), lhs_mk.dtype, lhs_mk, rhs_gkn, group_sizes_g)
    w_held = _zeros(rhs_gkn.shape[1:], rhs_gkn.dtype, rhs_gkn, group_sizes_g)
    return _tile_loop(group_sizes_g, m, tile, groups, (out, w_held), tile_fn)[0][:m]


def _tgmm(lhs_mk, dout_mn, group_sizes_g, tile: int, groups: int):
    """[g, k, n]: d rhs[e] = lhs_e^T d out_e over the rows of group e."""
    m, k = lhs_mk.shape
    lhs, dout = _pad_rows(lhs_mk, tile), _pad_rows(dout_mn, tile)

    def tile_fn(acc, group, first, mask, opens):
        x = jax.lax.dynamic_slice_in_dim(lhs, first, tile)
        dy = jnp.where(mask, jax.lax.dynamic_slice_in_dim(dout, first, tile), 0)
        dw = jnp.einsum("tk,tn->kn", x, dy)
        old = jax.lax.dynamic_index_in_dim(acc, group, keepdims=True)
        return jax.lax.dynamic_update_index_in_dim(acc, old + dw[None], group, 0)

    acc = _zeros((groups, k, dout_mn.shape[1]), lhs_mk.dtype, lhs_mk, dout_mn, group_sizes_g)
    return _tile_loop(group_sizes_g, m, tile, groups, acc, tile_fn)


def grouped_matmul(lhs_mk, rhs_gkn, group_sizes_g, tile: int):
    """[m, n]: each row times its group's matrix; rows past sum(group_sizes) are zero."""
    # The backward is traced later, outside the caller's matmul-precision context: it gets
    # the forward's precision (config.matmul_precision) explicitly.
    precision = jax.config.jax_default_matmul_precision
    return _grouped_matmul(lhs_mk, rhs_gkn, group_sizes_g, tile, precision)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _grouped_matmul(lhs_mk, rhs_gkn, group_sizes_g, tile: int, precision: str | None):
    return _gmm(lhs_mk, rhs_gkn, group_sizes_g, tile, transpose_rhs=False)


def _grouped_matmul_fwd(lhs_mk, rhs_gkn, group_sizes_g, tile, precision):
    out = _grouped_matmul(lhs_mk, rhs_gkn, group_sizes_g, tile, precision)
    return out, (lhs_mk, rhs_gkn, group_sizes_g)


def _grouped_matmul_bwd(tile, precision, residuals, dout_mn):
    lhs_mk, rhs_gkn, group_sizes_g = residuals
    # named_scope too: the backward is traced outside the caller's scope.
    with jax.named_scope("experts"), jax.default_matmul_precision(precision):
        dlhs = _gmm(dout_mn, rhs_gkn, group_sizes_g, tile, transpose_rhs=True)
        drhs = _tgmm(lhs_mk, dout_mn, group_sizes_g, tile, rhs_gkn.shape[0])
    return dlhs.astype(lhs_mk.dtype), drhs.astype(rhs_gkn.dtype), None


_grouped_matmul.defvjp(_grouped_matmul_fwd, _grouped_matmul_bwd)


def swiglu(x, w_gate, w_up, w_down):
    """down(silu(x W_gate) * x W_up): the FFN of dense layers, shared and routed experts."""
    h = jax.nn.silu(x @ w_gate) * (x @ w_up)
    return h @ w_down


def grouped_swiglu(x_mD, group_sizes_g, w_gate_gDI, w_up_gDI, w_down_gID, tile: int | None = None):
    """[m, D]: row r through the SwiGLU expert of its group (rows sorted by expert)."""
    tile = tile or tile_rows(x_mD.shape[0], w_gate_gDI.shape[0])
    # Inside shard_map the weights vary over the expert axes and the rows over the token
    # axes; give all of them the union (adding a zero that varies over it), so that autodiff,
    # not the custom VJP, sums each gradient over the axes its input did not vary over.
    inputs = (x_mD, w_gate_gDI, w_up_gDI, w_down_gID)
    zero = sum(jnp.zeros_like(v, shape=()) for v in inputs)
    x_mD, w_gate_gDI, w_up_gDI, w_down_gID = (v + zero.astype(v.dtype) for v in inputs)
    with jax.named_scope("experts"):
        gate = grouped_matmul(x_mD, w_gate_gDI, group_sizes_g, tile)
        up = grouped_matmul(x_mD, w_up_gDI, group_sizes_g, tile)
        return grouped_matmul(jax.nn.silu(gate) * up, w_down_gID, group_sizes_g, tile)


def routed_experts(x_ND, expert_NK, gate_NK, w_gate_EDI, w_up_EDI, w_down_EID, kernels="plain"):
    """sum_k gate[t, k] * expert_{expert[t, k]}(x[t]), [N, D], by the grouped matmul.

    An expert id >= E marks an empty slot (its gate is ignored). Assignments are sorted by
    expert (empty slots last, outside every group), run as one grouped SwiGLU (the grouped
    matmul `kernels` picks per platform, kernels/gmm.py), and summed back per token.
    """
    n, d = x_ND.shape
    e = w_gate_EDI.shape[0]
    expert_A = expert_NK.reshape(-1)
    order_A = jnp.argsort(expert_A, stable=True)
    token_A = order_A // expert_NK.shape[1]
    sizes_E = jnp.bincount(expert_A, length=e)  # ids >= E are not counted
    y_AD = routed_swiglu(
        kernels, grouped_swiglu, x_ND[token_A], sizes_E, w_gate_EDI, w_up_EDI, w_down_EID
    )
    live_A = expert_A[order_A] < e
    gate_A = jnp.where(live_A, gate_NK.reshape(-1)[order_A], 0).astype(y_AD.dtype)
    return jnp.zeros((n, d), y_AD.dtype).at[token_A].add(y_AD * gate_A[:, None])
