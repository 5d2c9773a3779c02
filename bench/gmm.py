"""The routed experts' grouped matmul on a Hopper GPU (H100/H200), at V2-Lite's expert shapes: the Mosaic GPU
kernels (the model's GPU path), XLA's `lax.ragged_dot`, the plain tiled loop (the CPU's
path), and one dense matmul of the same rows (the ideal), forward and forward + backward.

    python bench/gmm.py                 # 8192 tokens x 6 experts each = 49,152 rows
    python bench/gmm.py --tokens 2048
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from deepseek_jax.kernels.gmm import hopper_gmm
from deepseek_jax.model.experts import grouped_matmul, tile_rows


def median_ms(fn, *args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))  # compile
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return 1e3 * float(np.median(times))


def forward_backward(matmul):
    def f(lhs, rhs):
        out, vjp = jax.vjp(matmul, lhs, rhs)
        return vjp(out)

    return f


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--top_k", type=int, default=6)
    parser.add_argument("--d", type=int, default=2048, help="model width")
    parser.add_argument("--i", type=int, default=1408, help="expert width")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)
    if jax.default_backend() != "gpu":
        raise SystemExit("bench/gmm.py times the GPU's kernels: run it on a Hopper GPU host")

    rows, e, d, i = args.tokens * args.top_k, args.experts, args.d, args.i
    rng = np.random.RandomState(0)
    share = rng.dirichlet(np.full(e, 2.0))  # an uneven router, as in training
    sizes = jnp.asarray(np.bincount(rng.choice(e, rows, p=share), minlength=e), jnp.int32)
    lhs = jnp.asarray(rng.randn(rows, d), jnp.bfloat16)
    rhs = jnp.asarray(0.02 * rng.randn(e, d, i), jnp.bfloat16)
    print(
        f"{jax.devices()[0].device_kind}: {rows:,} rows ({args.tokens} tokens x {args.top_k}), "
        f"{e} experts, {d} -> {i}, bf16; the largest expert has {int(sizes.max())} rows"
    )
    tile = tile_rows(rows, e)
    matmuls = {
        "dense matmul of the rows (ideal)": lambda x, w: x @ w[0],
        "Mosaic GPU kernels (the model's)": lambda x, w: hopper_gmm(x, w, sizes),
        "lax.ragged_dot": lambda x, w: jax.lax.ragged_dot(x, w, sizes),
        f"plain tiled loop (tile {tile})": lambda x, w: grouped_matmul(x, w, sizes, tile),
    }
    print("| grouped matmul | forward ms | forward + backward ms |")
    print("|---|---:|---:|")
    for name, matmul in matmuls.items():
        fwd = median_ms(jax.jit(matmul), lhs, rhs, repeats=args.repeats)
        both = median_ms(jax.jit(forward_backward(matmul)), lhs, rhs, repeats=args.repeats)
        print(f"| {name} | {fwd:.2f} | {both:.2f} |", flush=True)


if __name__ == "__main__":
    main()
