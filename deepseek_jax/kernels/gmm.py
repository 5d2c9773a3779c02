"""The routed experts' grouped matmul by platform: megablox `gmm` (Pallas) on TPU,
`lax.ragged_dot` on GPU, the model's plain tiled path elsewhere.

Legend: R rows (tokens, or rows received by one device), K slots per row, A = R * K
assignments, D model width, I expert width, E experts (on this device), m, k, n a grouped
matmul's dims and g its groups.

Both kernels take the ragged_dot interface: lhs [m, k] with its rows sorted by group,
rhs [g, k, n], group_sizes [g] -> [m, n], row i multiplied by the matrix of its group; rows
past sum(group_sizes) come out zero. The callers (model/experts.py, parallel/expert.py) sort
the assignments by expert; `routed_swiglu` runs the SwiGLU as three such products (gate, up,
down) with the kernel the lowering platform calls for.
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


def swiglu_of(matmul: Callable) -> Callable:
    """The grouped SwiGLU over rows sorted by expert, with `matmul` as the grouped matmul."""

    def grouped_swiglu(x_mD, group_sizes_g, w_gate_gDI, w_up_gDI, w_down_gID):
        sizes = group_sizes_g.astype(jnp.int32)
        h_mI = jax.nn.silu(matmul(x_mD, w_gate_gDI, sizes)) * matmul(x_mD, w_up_gDI, sizes)
        return matmul(h_mI, w_down_gID, sizes)

    return grouped_swiglu


def megablox_fits(x_RD, w_gate_EDI) -> str | None:
    d, i = w_gate_EDI.shape[1:]
    if d % LANES or i % LANES:
        return f"experts of D={d}, I={i} (megablox tiles want multiples of {LANES})"
    return None


def routed_swiglu(
    kernels: str, plain: Callable, x_mD, group_sizes_g, w_gate_gDI, w_up_gDI, w_down_gID
):
    """[m, D]: row r through the SwiGLU expert of its group (rows sorted by expert, rows past
    the groups come out zero), by `plain` (the model's tiled grouped SwiGLU,
    model/experts.py) or the grouped-matmul kernel `kernels` picks (select.py). Called where
    the expert weights lie (inside the expert-parallel shard_map, or on one device)."""
    args = (x_mD, group_sizes_g, w_gate_gDI, w_up_gDI, w_down_gID)
    reason = megablox_fits(x_mD, w_gate_gDI)

    def tpu_kernel(interpret: bool):
        if reason:
            return reason
        return swiglu_of(lambda lhs, rhs, sizes: megablox_gmm(lhs, rhs, sizes, interpret=interpret))

    return by_platform(
        kernels,
        "gmm",
        args,
        plain,
        tpu=tpu_kernel(False),
        cuda=swiglu_of(ragged_dot),
        interpret=tpu_kernel(True),
    )
