"""The routed experts' grouped matmul by platform: megablox `gmm` (Pallas) on TPU,
`lax.ragged_dot` on GPU, the model's plain tiled path elsewhere.

Legend: R rows (tokens, or rows received by one device), K slots per row, A = R * K
assignments, D model width, I expert width, E experts (on this device), m, k, n a grouped
matmul's dims and g its groups.

Both kernels take the ragged_dot interface: lhs [m, k] with its rows sorted by group,
rhs [g, k, n], group_sizes [g] -> [m, n], row i multiplied by the matrix of its group; rows
past sum(group_sizes) come out zero. `routed_swiglu` sorts the assignments by expert once
and runs the SwiGLU as three such products (gate, up, down), then adds each assignment's
gated output back to its row.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.megablox import ops as megablox

from deepseek_jax.kernels.select import by_platform

LANES = 128


def megablox_gmm(lhs_mk, rhs_gkn, group_sizes_g, *, interpret: bool = False):
    """megablox gmm, with m padded to whole row tiles (rows past the groups come out zero)."""
    m, k = lhs_mk.shape
    n = rhs_gkn.shape[2]
    tm = 512 if m >= 4096 else LANES
    tile = (tm, min(k, 512) if k % 512 == 0 else LANES, min(n, 512) if n % 512 == 0 else LANES)
    padded = -(-m // tm) * tm
    lhs_mk = jnp.pad(lhs_mk, ((0, padded - m), (0, 0)))
    out = megablox.gmm(
        lhs_mk,
        rhs_gkn,
        group_sizes_g.astype(jnp.int32),
        preferred_element_type=lhs_mk.dtype,
        tiling=tile,
        interpret=interpret,
    )
    return out[:m]


def ragged_dot(lhs_mk, rhs_gkn, group_sizes_g):
    return jax.lax.ragged_dot(lhs_mk, rhs_gkn, group_sizes_g.astype(jnp.int32))


def sorted_swiglu(matmul: Callable, x_RD, expert_RK, gate_RK, w_gate_EDI, w_up_EDI, w_down_EID):
    """sum_k gate[r, k] * expert_{expert[r, k]}(x[r]) by a grouped matmul; id E = empty slot."""
    r, d = x_RD.shape
    e = w_gate_EDI.shape[0]
    order_A = jnp.argsort(expert_RK.reshape(-1), stable=True)  # empty slots (id E) sort last
    row_A = order_A // expert_RK.shape[1]
    sizes_E = jnp.bincount(expert_RK.reshape(-1), length=e).astype(jnp.int32)
    x_AD = x_RD[row_A]
    with jax.named_scope("experts"):
        h_AI = jax.nn.silu(matmul(x_AD, w_gate_EDI, sizes_E)) * matmul(x_AD, w_up_EDI, sizes_E)
        y_AD = matmul(h_AI, w_down_EID, sizes_E)
    gate_A = gate_RK.reshape(-1)[order_A]
    y_AD = y_AD * gate_A[:, None].astype(y_AD.dtype)
    return jnp.zeros((r, d), y_AD.dtype).at[row_A].add(y_AD)


def megablox_fits(x_RD, w_gate_EDI) -> str | None:
    d, i = w_gate_EDI.shape[1:]
    if d % LANES or i % LANES:
        return f"experts of D={d}, I={i} (megablox tiles want multiples of {LANES})"
    return None


def routed_swiglu(
    kernels: str, plain: Callable, x_RD, expert_RK, gate_RK, w_gate_EDI, w_up_EDI, w_down_EID
):
    """[R, D]: `plain(x, expert, gate, w_gate, w_up, w_down)` (the model's tiled grouped
    SwiGLU) or the grouped-matmul kernel `kernels` picks (select.py). Called where the expert
    weights lie (inside the expert-parallel shard_map, or on one device)."""
    args = (x_RD, expert_RK, gate_RK, w_gate_EDI, w_up_EDI, w_down_EID)
    reason = megablox_fits(x_RD, w_gate_EDI)

    def tpu_kernel(interpret: bool):
        if reason:
            return reason

        def matmul(lhs, rhs, sizes):
            return megablox_gmm(lhs, rhs, sizes, interpret=interpret)

        return lambda *a: sorted_swiglu(matmul, *a)

    return by_platform(
        kernels,
        "gmm",
        args,
        plain,
        tpu=tpu_kernel(False),
        cuda=lambda *a: sorted_swiglu(ragged_dot, *a),
        interpret=tpu_kernel(True),
    )
