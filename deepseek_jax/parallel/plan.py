"""Per-device memory and all-to-all traffic of a config on a mesh, without allocating it.

    deepseek-jax-plan --preset v2 --mesh data=4,expert=8 --param_dtype bfloat16 --dtype bfloat16

(= python -m deepseek_jax.parallel.plan; flags as every command's, cli/parser.py.)

Params, AdamW's two fp32 moments and the latent cache come from `jax.eval_shape` and the
rules table's shardings; all-to-all bytes per token come from the lowered HLO of one MoE
layer's expert-parallel dispatch (pack, all_to_all, experts, all_to_all back), with
device-limited routing (the config's M of G groups) against unrestricted (greedy) routing.
Fake CPU devices stand in for the mesh, so this runs on a laptop. A command-line tool over
the model and the rules, so it imports the model (the model never imports it).
"""

from __future__ import annotations

import math
import re

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from deepseek_jax import errors
from deepseek_jax.cli.parser import Parser
from deepseek_jax.config import DTYPES, PRESETS, ModelConfig, preset
from deepseek_jax.errors import UserError
from deepseek_jax.model.moe import route
from deepseek_jax.model.transformer import init_cache, init_params
from deepseek_jax.parallel import expert, rules
from deepseek_jax.parallel.mesh import make_mesh, parse_mesh

GiB = 2**30
# The operand type of each all_to_all: `... : (tensor<128x256xf32>) -> ...`
A2A = re.compile(r"stablehlo\.all_to_all.*?: \(tensor<((?:\d+x)*)([a-z]+\d+)>\)")
MLIR_BYTES = {"bf16": 2, "f16": 2, "f32": 4, "i32": 4, "i64": 8, "i1": 1}


def per_device_bytes(shapes, shardings) -> int:
    """Bytes one device holds of a tree of ShapeDtypeStructs placed by `shardings`."""
    sizes = jax.tree.map(
        lambda x, s: math.prod(s.shard_shape(x.shape)) * jnp.dtype(x.dtype).itemsize,
        shapes,
        shardings,
    )
    return sum(jax.tree.leaves(sizes))


def memory(cfg: ModelConfig, mesh, batch: int, length: int) -> dict[str, int]:
    params = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
    fp32 = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32), params)
    state = jax.eval_shape(optax.adamw(1e-3).init, fp32)
    cache = jax.eval_shape(lambda: init_cache(cfg, batch, length))
    return {
        "params": per_device_bytes(params, rules.param_shardings(cfg, mesh)),
        "adamw moments (fp32)": per_device_bytes(
            state, rules.opt_state_shardings(cfg, mesh, state)
        ),
        f"latent cache (B {batch}, S {length}, {cfg.dtype})": per_device_bytes(
            cache, rules.cache_shardings(mesh, cache)
        ),
    }


def all_to_all_bytes(hlo: str) -> int:
    """Bytes one device puts through all_to_all ops in a lowered (StableHLO) module."""
    total = 0
    for dims, dtype in A2A.findall(hlo):
        total += math.prod(int(n) for n in dims.split("x") if n) * MLIR_BYTES[dtype]
    return total


def dispatch_hlo(cfg: ModelConfig, mesh, batch: int, length: int) -> str:
    """The lowered module of one MoE layer's routed experts, on abstract sharded inputs."""
    d, e, i = cfg.hidden_size, cfg.n_routed_experts, cfg.moe_intermediate_size
    never_drop = expert.never_drop_tokens(cfg, batch, length)
    dtype = jnp.dtype(cfg.dtype)

    def abstract(shape, logical, dt=dtype):
        return jax.ShapeDtypeStruct(shape, dt, sharding=NamedSharding(mesh, rules.spec(logical)))

    def routed(x, centroids, w_gate, w_up, w_down):
        return expert.expert_parallel(
            cfg, mesh, route, x, never_drop, centroids, w_gate, w_up, w_down
        )[0]

    args = (
        abstract((batch * length, d), ("batch", "act_embed")),
        jax.ShapeDtypeStruct((d, e), jnp.float32, sharding=NamedSharding(mesh, P())),
        abstract((e, d, i), ("expert", "embed", "expert_mlp")),
        abstract((e, d, i), ("expert", "embed", "expert_mlp")),
        abstract((e, i, d), ("expert", "expert_mlp", "embed")),
    )
    return jax.jit(routed).lower(*args).as_text()


def traffic(cfg: ModelConfig, mesh, batch: int, length: int) -> dict[str, float]:
    """All-to-all bytes per token that leave a device: device-limited vs unrestricted."""
    p = expert.expert_devices(cfg, mesh)
    tokens = batch * length / math.prod(mesh.shape[a] for a in rules.token_axes())
    out = {}
    for label, method in (
        (f"device-limited (M={cfg.topk_group} of {cfg.n_group} groups)", "group_limited_greedy"),
        (f"unrestricted (greedy top-{cfg.num_experts_per_tok})", "greedy"),
    ):
        hlo = dispatch_hlo(cfg.replace(topk_method=method), mesh, batch, length)
        out[label] = all_to_all_bytes(hlo) * (p - 1) / p / tokens
    return out


@errors.report_errors("deepseek-jax-plan")
def main(argv: list[str] | None = None) -> None:
    parser = Parser("deepseek-jax-plan", __doc__)
    parser.add_argument("--preset", default="v2", choices=sorted(PRESETS))
    parser.add_argument("--mesh", default="data=1", help="e.g. data=4,fsdp=2,expert=8")
    parser.add_argument(
        "--batch",
        type=int,
        default=None,
        help="sequences per step (default 10 per batch-splitting device, so that the 10%% "
        "never-drop sequences are spread over the devices rather than all or nothing)",
    )
    parser.add_argument("--seq_len", type=int, default=4096)
    parser.add_argument("--capacity_factor", type=float, default=1.0, help="0 for dropless")
    parser.add_argument("--dtype", choices=DTYPES, help="compute and cache dtype")
    parser.add_argument("--param_dtype", choices=DTYPES)
    args = parser.parse_args(argv)

    sizes = parse_mesh(args.mesh)
    # Fake CPU devices for the mesh; must precede the first use of a jax backend.
    jax.config.update("jax_num_cpu_devices", math.prod(sizes.values()))
    mesh = make_mesh(**sizes)
    cfg = preset(args.preset).replace(
        capacity_factor=args.capacity_factor or None,
        dtype=args.dtype or preset(args.preset).dtype,
        param_dtype=args.param_dtype or preset(args.preset).param_dtype,
    )
    splits = math.prod(mesh.shape[a] for a in rules.token_axes())
    batch = args.batch or 10 * splits
    if cfg.n_routed_experts % mesh.shape["expert"]:
        raise UserError(
            f"--mesh expert={mesh.shape['expert']} does not divide the {cfg.n_routed_experts} "
            f"routed experts of {args.preset}: give a divisor"
        )
    if batch % splits:
        raise UserError(f"--batch {batch} does not split over {splits} devices: give a multiple")

    print(
        f"{args.preset} on mesh {dict(mesh.shape)}: params {cfg.param_dtype}, compute "
        f"{cfg.dtype}, batch {batch} x {args.seq_len}, capacity factor {cfg.capacity_factor}"
    )
    print("per-device memory")
    for name, size in memory(cfg, mesh, batch, args.seq_len).items():
        print(f"  {name:44s} {size / GiB:10.2f} GiB")
    print("all-to-all bytes per token leaving a device (dispatch + combine, one MoE layer)")
    for name, size in traffic(cfg, mesh, batch, args.seq_len).items():
        print(
            f"  {name:44s} {size:10,.0f} B   x {cfg.num_moe_layers} layers = "
            f"{size * cfg.num_moe_layers / 2**20:8.2f} MiB"
        )


if __name__ == "__main__":
    main()
