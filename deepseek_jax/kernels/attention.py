"""Expanded MLA attention (training, prefill) by platform: Pallas splash attention on TPU,
cuDNN on GPU, the model's plain path elsewhere.

Legend: B batch, T query positions, S key positions (S = T: self-attention), H heads,
K = dn + dr query/key head dim (192 for V2), V value head dim (128).

    o_BTHV = expanded_attention(cfg.kernels, q_BTHK, k_BTHK, v_BTHV, segments_BT, scale, plain)

The mask is causal within a document: key s is visible to query t iff s <= t and both carry
the same segment id (packed documents; one id per row when nothing is packed).

MLA's heads do not fit the stock kernels as they are:
  * TPU: splash attention takes a value head dim different from the query/key one, but its
    tiles want lane-aligned head dims, so q and k are zero-padded from K = 192 to 256 (the
    zero columns add nothing to q.k). Its sequence blocks want T a multiple of 128.
  * GPU: cuDNN wants one head dim for q, k and v, so v is zero-padded to K and the output
    sliced back to V; it has no segment ids, so a batch with packed documents takes the plain
    path (decided on the device per batch); it takes bf16/fp16 only, and tracing it needs a
    GPU on the host (a cuda export made on a CPU host carries the plain path).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks
from jax.sharding import Mesh

from deepseek_jax.kernels.select import by_platform, per_shard

LANES = 128  # TPU vector lanes: the head dims and sequence blocks of the TPU kernels align to it
CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)
CUDNN_MAX_HEAD_DIM = 256


# splash.BlockSizes' fields: query, key/value and compute tiles of the forward, dkv and dq passes.
SPLASH_BLOCKS = (
    "block_q", "block_kv", "block_kv_compute", "block_q_dkv", "block_kv_dkv",
    "block_kv_dkv_compute", "block_q_dq", "block_kv_dq",
)  # fmt: skip


def sequence_block(t: int) -> int | None:
    """The largest of 512, 256, 128 that divides t (None: no TPU block fits)."""
    return next((b for b in (512, 256, LANES) if t % b == 0), None)


def pad_last(x: jnp.ndarray, size: int) -> jnp.ndarray:
    return jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, size - x.shape[-1])])


def splash_attention(q_BTHK, k_BTHK, v_BTHV, segments_BT, *, scale: float, interpret: bool):
    """Causal, segment-masked attention with JAX's Pallas splash kernel (TPU, or interpreted)."""
    b, t, h, k = q_BTHK.shape
    padded = -(-k // LANES) * LANES
    block = sequence_block(t)
    # One block size for every tile of the forward and both backward passes.
    sizes = splash.BlockSizes(**dict.fromkeys(SPLASH_BLOCKS, block))
    kernel = splash.make_splash_mha(
        masks.MultiHeadMask([masks.CausalMask((t, t))] * h),
        block_sizes=sizes,
        head_shards=1,
        q_seq_shards=1,
        interpret=interpret,
    )
    # The kernel does not scale the scores; scaling q first is the same product.
    q_BTHK = pad_last(q_BTHK * jnp.asarray(scale, q_BTHK.dtype), padded)
    k_BTHK = pad_last(k_BTHK, padded)

    def one_row(q_THK, k_THK, v_THV, segments_T):
        ids = splash.SegmentIds(q=segments_T, kv=segments_T)
        o_HTV = kernel(q_THK.swapaxes(0, 1), k_THK.swapaxes(0, 1), v_THV.swapaxes(0, 1), ids)
        return o_HTV.swapaxes(0, 1)

    return jax.vmap(one_row)(q_BTHK, k_BTHK, v_BTHV, segments_BT)


def splash_fits(q_BTHK) -> str | None:
    """Why splash cannot take these shapes, or None when it can."""
    t = q_BTHK.shape[1]
    if sequence_block(t) is None:
        return f"T={t} (splash needs a multiple of {LANES} positions)"
    return None


def cudnn_attention(q_BTHK, k_BTHK, v_BTHV, segments_BT, *, scale: float):
    """cuDNN's fused causal attention (no segments), v padded to the q/k head dim."""
    v = v_BTHV.shape[-1]
    v_BTHK = pad_last(v_BTHV, q_BTHK.shape[-1])
    o = jax.nn.dot_product_attention(
        q_BTHK, k_BTHK, v_BTHK, scale=scale, is_causal=True, implementation="cudnn"
    )
    return o[..., :v]


def cudnn_fits(q_BTHK) -> str | None:
    """Why cuDNN cannot take these inputs here, or None when it can."""
    if jax.default_backend() != "gpu":
        return f"a host without a GPU (backend {jax.default_backend()!r}; cuDNN traces on one)"
    if q_BTHK.dtype not in CUDNN_DTYPES:
        return f"dtype {q_BTHK.dtype} (cuDNN attention takes bfloat16 or float16)"
    if q_BTHK.shape[-1] > CUDNN_MAX_HEAD_DIM or q_BTHK.shape[-1] % 8:
        return f"head dim {q_BTHK.shape[-1]} (cuDNN takes a multiple of 8 up to 256)"
    return None


def expanded_attention(
    kernels: str,
    q_BTHK: jnp.ndarray,
    k_BTHK: jnp.ndarray,
    v_BTHV: jnp.ndarray,
    segments_BT: jnp.ndarray,
    scale: float,
    plain: Callable,
    mesh: Mesh | None = None,
) -> jnp.ndarray:
    """o [B, T, H, V]: `plain(q, k, v, segments)` or the kernel `kernels` picks (select.py).

    With a mesh, a kernel runs per shard (batch over the token axes, heads over "tensor"):
    a Pallas call is opaque to the sharding propagation, which would otherwise gather it.
    """
    args = (q_BTHK, k_BTHK, v_BTHV, segments_BT)
    logical = (("batch", "length", "act_heads", None),) * 3 + (("batch", "length"),)

    def sharded(fn):
        return per_shard(mesh, fn, args, logical, ("batch", "length", "act_heads", None))

    def tpu_kernel(interpret: bool):
        reason = splash_fits(q_BTHK)
        if reason:
            return f"q of shape {q_BTHK.shape}: {reason}"
        return sharded(lambda *a: splash_attention(*a, scale=scale, interpret=interpret))

    def cuda_kernel():
        reason = cudnn_fits(q_BTHK)
        fused = reason or sharded(lambda *a: cudnn_attention(*a, scale=scale))
        if isinstance(fused, str):
            return f"q of shape {q_BTHK.shape}: {fused}"

        def unless_packed(*a):  # cuDNN has no segment ids: a packed batch goes plain
            unpacked = jnp.all(segments_BT == segments_BT[:, :1])
            return jax.lax.cond(unpacked, fused, plain, *a)

        return unless_packed

    return by_platform(
        kernels,
        "attention",
        args,
        plain,
        tpu=tpu_kernel(False),
        cuda=cuda_kernel(),
        interpret=tpu_kernel(True),
    )
