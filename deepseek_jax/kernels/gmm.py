"""The routed experts' grouped matmul by platform: megablox `gmm` (Pallas) on TPU, JAX's
Mosaic GPU ragged-dot kernels on Hopper GPUs, the model's plain tiled path elsewhere.

Legend: R rows (tokens, or rows received by one device), K slots per row, A = R * K
assignments, D model width, I expert width, E experts (on this device), m, k, n a grouped
matmul's dims and g its groups.

Every kernel takes the ragged_dot interface: lhs [m, k] with its rows sorted by group,
rhs [g, k, n], group_sizes [g] -> [m, n], row i multiplied by the matrix of its group; rows
past sum(group_sizes) come out zero. The callers (model/experts.py, parallel/expert.py) sort
the assignments by expert; `routed_swiglu` runs the SwiGLU as three such products (gate, up,
down) with the kernel the lowering platform calls for.

Not XLA's own `lax.ragged_dot` on GPU: its gradient for the weights (a ragged contraction)
compiles to a dense [g, m, k] masked product, g times the work and memory (measured on an
H200: the V2-Lite train step at 8 x 4096 tokens asked for 48 GiB buffers for one layer).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu, transposed_ragged_dot_mgpu
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


# Hopper tiles: 128 x 128 output blocks, the contraction in steps of 64.
HOPPER_TILES = dict(block_m=LANES, block_n=LANES, block_k=64, grid_block_n=1)
HOPPER_DTYPES = (jnp.bfloat16, jnp.float16)


def _rows_in_groups(x_mn, group_sizes_g):
    """Rows past sum(group_sizes) as zeros: the kernel leaves them unwritten."""
    live = jnp.arange(x_mn.shape[0])[:, None] < jnp.sum(group_sizes_g)
    return jnp.where(live, x_mn, jnp.zeros((), x_mn.dtype))


@jax.custom_vjp
def hopper_gmm(lhs_mk, rhs_gkn, group_sizes_g):
    """The grouped matmul by JAX's Mosaic GPU kernels (Hopper, 16-bit): ragged_dot forward
    and for d lhs (rhs transposed), transposed_ragged_dot for d rhs (megablox's gmm/tgmm)."""
    out = ragged_dot_mgpu.ragged_dot(
        lhs_mk, rhs_gkn, group_sizes=group_sizes_g, max_concurrent_steps=4, **HOPPER_TILES
    )
    return _rows_in_groups(out, group_sizes_g)


def _hopper_gmm_fwd(lhs_mk, rhs_gkn, group_sizes_g):
    return hopper_gmm(lhs_mk, rhs_gkn, group_sizes_g), (lhs_mk, rhs_gkn, group_sizes_g)


def _hopper_gmm_bwd(residuals, dout_mn):
    lhs_mk, rhs_gkn, group_sizes_g = residuals
    dlhs_mk = ragged_dot_mgpu.ragged_dot(
        dout_mn, rhs_gkn, group_sizes=group_sizes_g, transpose_rhs=True,
        max_concurrent_steps=4, **HOPPER_TILES,
    )  # fmt: skip
    # d rhs[g] = lhs_g^T d out_g: the rows are the contraction, cut into the groups.
    drhs_gkn = transposed_ragged_dot_mgpu.transposed_ragged_dot(
        lhs_mk, dout_mn, group_sizes=group_sizes_g, max_concurrent_steps=2, **HOPPER_TILES
    )
    return _rows_in_groups(dlhs_mk, group_sizes_g), drhs_gkn, None


hopper_gmm.defvjp(_hopper_gmm_fwd, _hopper_gmm_bwd)


def hopper_fits(x_mD, w_gate_EDI) -> str | None:
    """Why the Hopper kernels cannot take these inputs here, or None when they can."""
    if jax.default_backend() != "gpu":
        return f"a host without a GPU (backend {jax.default_backend()!r}; the kernels trace on one)"
    capability = getattr(jax.devices()[0], "compute_capability", "?")
    if not capability.startswith("9."):
        return f"a GPU of compute capability {capability} (the kernels are Hopper's, 9.x)"
    if x_mD.dtype not in HOPPER_DTYPES or w_gate_EDI.dtype != x_mD.dtype:
        return f"dtypes {x_mD.dtype} x {w_gate_EDI.dtype} (the kernels take bf16 or fp16)"
    d, i = w_gate_EDI.shape[1:]
    if d % LANES or i % LANES:
        return f"experts of D={d}, I={i} (the kernels want multiples of {LANES})"
    return None


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
        cuda=hopper_fits(x_mD, w_gate_gDI) or swiglu_of(hopper_gmm),
        interpret=tpu_kernel(True),
    )
