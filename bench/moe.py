"""The MoE layer against a dense SwiGLU with the same active parameters, on the CPU.

    python bench/moe.py [--preset small] [--batch 8] [--seq-len 512]

Dense width = (n_shared + K) * moe_intermediate: what one token multiplies by in the MoE.
Rows: the plain single-device MoE (model/moe.py), and the expert-parallel all-to-all dispatch
on 4 fake CPU devices (dropless, and capacity factor 1.25). The fake devices share this
machine's cores, so the EP rows measure the dispatch's overhead, not a speed-up. Forward and
forward+backward, median of --repeats runs after a compile.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

EP = 4
jax.config.update("jax_num_cpu_devices", EP)  # before any backend starts

import deepseek_jax as dj  # noqa: E402
from deepseek_jax.model.layers import MLP  # noqa: E402
from deepseek_jax.model.moe import MoE  # noqa: E402
from deepseek_jax.parallel import rules  # noqa: E402


def timed(fn, *args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def forward_and_grad(module, params, x):
    def loss(p, x):
        y = module.apply({"params": p}, x)
        y = y[0] if isinstance(y, tuple) else y
        return jnp.mean(y**2)

    return jax.jit(lambda p, x: loss(p, x)), jax.jit(jax.grad(loss, argnums=(0, 1)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()

    cfg = dj.preset(args.preset).replace(initializer_range=0.02)
    width = (cfg.n_shared_experts + cfg.num_experts_per_tok) * cfg.moe_intermediate_size
    x = jax.random.normal(jax.random.key(0), (args.batch, args.seq_len, cfg.hidden_size))
    mesh = dj.make_mesh(expert=EP)
    rows = {
        f"dense SwiGLU, width {width}": (MLP(cfg, width), None),
        "MoE, one device (plain dispatch)": (MoE(cfg), None),
        f"MoE, {EP}-way EP all-to-all, dropless": (MoE(cfg, mesh), mesh),
        f"MoE, {EP}-way EP all-to-all, capacity 1.25": (
            MoE(cfg.replace(capacity_factor=1.25), mesh),
            mesh,
        ),
    }
    tokens = args.batch * args.seq_len
    print(
        f"{args.preset}: D {cfg.hidden_size}, E {cfg.n_routed_experts}, K "
        f"{cfg.num_experts_per_tok}, shared {cfg.n_shared_experts}, I "
        f"{cfg.moe_intermediate_size}; {tokens} tokens; fp32; {jax.device_count()} CPU devices"
    )
    print(f"{'':46s} {'fwd ms':>8s} {'ratio':>6s} {'fwd+bwd ms':>11s} {'ratio':>6s}")
    base = None
    for name, (module, on_mesh) in rows.items():
        params = module.init(jax.random.key(1), x[:1])["params"]
        params = jax.tree.map(lambda a: a.unbox() if hasattr(a, "unbox") else a, params)
        inputs = x
        if on_mesh is not None:
            inputs = jax.device_put(x, rules.batch_sharding(on_mesh))
        fwd, grad = forward_and_grad(module, params, inputs)
        t = np.array([timed(f, params, inputs, repeats=args.repeats) for f in (fwd, grad)])
        base = t if base is None else base
        ratio = t / base
        print(f"{name:46s} {t[0] * 1e3:8.1f} {ratio[0]:6.2f} {t[1] * 1e3:11.1f} {ratio[1]:6.2f}")


if __name__ == "__main__":
    main()
