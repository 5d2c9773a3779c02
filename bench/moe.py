"""The MoE layer against a dense SwiGLU with the same active parameters, on the CPU.

    python bench/moe.py [--preset small] [--batch 8] [--seq_len 512] [--repeats 3]

Dense width = (n_shared + K) * moe_intermediate: what one token multiplies by in the MoE.
Rows: the plain single-device MoE (model/moe.py: grouped matmul), and the expert-parallel
all-to-all dispatch on 4 fake CPU devices, dropless (eval, generation) and as the train step
runs it (train=True, capacity factor 1.0). Every row's weights and inputs are placed where
its program wants them before timing, so the times hold compute and the copies the program
itself makes. The fake devices share this machine's cores: the EP rows measure what the
dispatch costs over the same useful work, not a speed-up. Beside the times, read from each
compiled program: all-to-all bytes and expert-matmul FLOPs per token (forward; loop bodies
times their trip counts), the FLOPs as a multiple of the useful 6 K D I.
Forward and forward+backward, min and median of --repeats runs after a compile.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp

EP = 4
jax.config.update("jax_num_cpu_devices", EP)  # before any backend starts

import deepseek_jax as dj  # noqa: E402
from deepseek_jax.model.layers import MLP  # noqa: E402
from deepseek_jax.model.moe import MoE  # noqa: E402
from deepseek_jax.parallel import hlo, rules  # noqa: E402


def timed(fn, *args, repeats: int) -> tuple[float, float]:
    """(min, median) seconds of `repeats` runs after one warm-up run."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return min(times), statistics.median(times)


def programs(module):
    def loss(p, x):
        y = module.apply({"params": p}, x)
        y = y[0] if isinstance(y, tuple) else y
        return jnp.mean(y**2)

    return jax.jit(loss), jax.jit(jax.grad(loss, argnums=(0, 1)))


def place(module, mesh, x):
    """(params, x) where the row's program reads them: on the mesh by the rules, or as is."""
    boxed = module.init(jax.random.key(1), x[:EP])["params"]  # rows that split over the mesh
    params = jax.tree.map(
        lambda a: a.unbox() if hasattr(a, "unbox") else a,
        boxed,
        is_leaf=lambda a: hasattr(a, "unbox"),
    )
    if mesh is None:
        return params, x
    shardings = jax.tree.map(
        lambda a: jax.sharding.NamedSharding(mesh, rules.spec(a.names)),
        boxed,
        is_leaf=lambda a: hasattr(a, "names"),
    )
    return jax.device_put(params, shardings), jax.device_put(x, rules.batch_sharding(mesh))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq_len", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    cfg = dj.preset(args.preset).replace(initializer_range=0.02)
    d, k, i = cfg.hidden_size, cfg.num_experts_per_tok, cfg.moe_intermediate_size
    width = (cfg.n_shared_experts + k) * i
    x = jax.random.normal(jax.random.key(0), (args.batch, args.seq_len, d))
    mesh = dj.make_mesh(expert=EP)
    train = cfg.replace(capacity_factor=1.0)
    rows = {
        f"dense SwiGLU, width {width}": (MLP(cfg, width), None),
        "MoE, one device (plain dispatch)": (MoE(cfg), None),
        f"MoE, {EP}-way EP, dropless": (MoE(cfg, mesh), mesh),
        f"MoE, {EP}-way EP, train=True cf 1.0": (MoE(train, mesh, train=True), mesh),
    }
    tokens = args.batch * args.seq_len
    print(
        f"{args.preset}: D {d}, E {cfg.n_routed_experts}, K {k}, shared "
        f"{cfg.n_shared_experts}, I {i}; {tokens} tokens; fp32; {jax.device_count()} CPU "
        f"devices; {args.repeats} timed runs, min / median ms"
    )
    print(
        f"{'':40s} {'fwd min':>8s} {'med':>7s} {'fwd+bwd min':>12s} {'med':>7s} {'ratio':>6s}"
        f" {'a2a B/tok':>10s} {'expert FLOPs/tok':>17s}"
    )
    base = None
    for name, (module, on_mesh) in rows.items():
        params, inputs = place(module, on_mesh, x)
        fwd, grad = programs(module)
        text = fwd.lower(params, inputs).compile().as_text()
        per_device = tokens / (EP if on_mesh is not None else 1)
        a2a = hlo.all_to_all_bytes(text) / per_device
        flops = hlo.dot_flops(text, "experts") / per_device
        f_min, f_med = timed(fwd, params, inputs, repeats=args.repeats)
        g_min, g_med = timed(grad, params, inputs, repeats=args.repeats)
        base = g_min if base is None else base
        useful = f"{flops:10,.0f} ({flops / (6 * k * d * i):4.2f}x)" if flops else ""
        print(
            f"{name:40s} {f_min * 1e3:8.1f} {f_med * 1e3:7.1f} {g_min * 1e3:12.1f} "
            f"{g_med * 1e3:7.1f} {g_min / base:6.2f} {a2a:10,.0f} {useful:>17s}"
        )


if __name__ == "__main__":
    main()
