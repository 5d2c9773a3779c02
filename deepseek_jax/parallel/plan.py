"""Per-device memory, all-to-all traffic and expert FLOPs of a config on a mesh, without
allocating it.

    deepseek-jax-plan --preset v2 --mesh data=4,expert=8 --param_dtype bfloat16 --dtype bfloat16

(= python -m deepseek_jax.parallel.plan; flags as every command's, cli/parser.py.)

Params, their gradients, AdamW's two moments (all in the params' dtype, as the train step
keeps them) and the latent cache come from `jax.eval_shape` and the
rules table's shardings. One MoE layer's routed experts are costed twice: predicted from
shapes alone (`predicted_layer_cost`: the dispatch's C and B from `expert.sizes`) and read
from the program XLA compiles for it (`compiled_layer_cost`: all-to-all operand bytes and
the expert dots' FLOPs, loop bodies times their trip counts, `hlo.py`); the tests hold the
two within 10%. Fake CPU devices stand in for the mesh, so this runs on a laptop (and on a
GPU/TPU host, where it asks for the CPU platform). A command-line tool over the model and
the rules, so it imports the model (the model never imports it).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from deepseek_jax.cli.parser import Parser
from deepseek_jax.config import COMPUTE_DTYPES, DTYPES, PRESETS, ModelConfig, preset, resolve_dtype
from deepseek_jax.errors import UserError, report_errors
from deepseek_jax.model.experts import tile_rows
from deepseek_jax.model.moe import route
from deepseek_jax.model.transformer import init_cache, init_params
from deepseek_jax.parallel import expert, hlo, placement, rules
from deepseek_jax.parallel.mesh import make_mesh, parse_mesh

GiB = 2**30


def per_device_bytes(shapes, shardings) -> int:
    """Bytes one device holds of a tree of ShapeDtypeStructs placed by `shardings`."""
    sizes = jax.tree.map(
        lambda x, s: math.prod(s.shard_shape(x.shape)) * jnp.dtype(x.dtype).itemsize,
        shapes,
        shardings,
    )
    return sum(jax.tree.leaves(sizes))


def memory(cfg: ModelConfig, mesh, batch: int, length: int) -> dict[str, int]:
    cfg = resolve_dtype(cfg, mesh)
    params = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
    # The train step's AdamW (optax's default mu_dtype) keeps its moments in the params' dtype.
    state = jax.eval_shape(optax.adamw(1e-3).init, params)
    cache = jax.eval_shape(lambda: init_cache(cfg, batch, length))
    shardings = placement.param_shardings(cfg, mesh)
    return {
        f"params ({cfg.param_dtype})": per_device_bytes(params, shardings),
        f"gradients ({cfg.param_dtype})": per_device_bytes(params, shardings),
        f"adamw moments ({cfg.param_dtype})": per_device_bytes(
            state, placement.opt_state_shardings(cfg, mesh, state)
        ),
        f"latent cache (B {batch}, S {length}, {cfg.dtype})": per_device_bytes(
            cache, placement.cache_shardings(mesh, cache)
        ),
    }


def layer_sizes(cfg: ModelConfig, mesh, batch: int, length: int, drop: bool) -> expert.Sizes:
    """The dispatch's static sizes for one MoE layer of a [batch, length] call."""
    p = expert.expert_devices(cfg, mesh)
    never_drop = expert.never_drop_tokens(cfg, batch, length)
    n = batch * length // rules.token_devices(mesh)
    protected = int(never_drop.reshape(-1, n).sum(axis=1).max())
    return expert.sizes(cfg, p, n, protected, drop and cfg.capacity_factor is not None)


def predicted_layer_cost(cfg: ModelConfig, mesh, batch: int, length: int, drop: bool) -> dict:
    """Per token on one device, from shapes: all-to-all bytes (token rows, and all told with
    the slot metadata) and routed-expert FLOPs at the grouped matmul's compiled bound."""
    cfg = resolve_dtype(cfg, mesh)
    size = layer_sizes(cfg, mesh, batch, length, drop)
    p = expert.expert_devices(cfg, mesh)
    d, k, l = cfg.hidden_size, cfg.num_experts_per_tok, cfg.n_routed_experts // p
    width = cfg.moe_intermediate_size // math.prod(mesh.shape[a] for a in rules.TABLE["expert_mlp"])
    rows = p * size.c
    activations = 2 * rows * d * jnp.dtype(cfg.dtype).itemsize  # dispatch + combine
    metadata = rows * k * (3 * 4 + 1)  # (expert, gate, priority) f32 out, kept int8 back
    tile = tile_rows(size.budget, l)
    tiles = -(-size.budget // tile) + l
    return {
        "activation bytes": activations / size.n,
        "all-to-all bytes": (activations + metadata) / size.n,
        "expert flops": 6 * d * width * tiles * tile / size.n,
    }


def layer_hlo(cfg: ModelConfig, mesh, batch: int, length: int, drop: bool) -> str:
    """The compiled program of one MoE layer's routed experts, on abstract sharded inputs."""
    d, e, i = cfg.hidden_size, cfg.n_routed_experts, cfg.moe_intermediate_size
    never_drop = expert.never_drop_tokens(cfg, batch, length)
    dtype = jnp.dtype(resolve_dtype(cfg, mesh).dtype)

    def abstract(shape, logical, dt=dtype):
        return jax.ShapeDtypeStruct(shape, dt, sharding=NamedSharding(mesh, rules.spec(logical)))

    def routed(x, centroids, w_gate, w_up, w_down):
        return expert.expert_parallel(
            cfg, mesh, route, x, never_drop, centroids, w_gate, w_up, w_down, drop=drop
        )[0]

    args = (
        abstract((batch * length, d), ("batch", "act_embed")),
        jax.ShapeDtypeStruct((d, e), jnp.float32, sharding=NamedSharding(mesh, P())),
        abstract((e, d, i), ("expert", "embed", "expert_mlp")),
        abstract((e, d, i), ("expert", "embed", "expert_mlp")),
        abstract((e, i, d), ("expert", "expert_mlp", "embed")),
    )
    return jax.jit(routed).lower(*args).compile().as_text()


def compiled_layer_cost(cfg: ModelConfig, mesh, batch: int, length: int, drop: bool) -> dict:
    """Per token on one device, read from the compiled program (same keys as predicted)."""
    text = layer_hlo(cfg, mesh, batch, length, drop)
    n = batch * length / rules.token_devices(mesh)
    return {
        "activation bytes": hlo.all_to_all_bytes(text, last_dim=cfg.hidden_size) / n,
        "all-to-all bytes": hlo.all_to_all_bytes(text) / n,
        "expert flops": hlo.dot_flops(text, scope="experts") / n,
    }


@report_errors("deepseek-jax-plan")
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
    parser.add_argument(
        "--dtype",
        choices=COMPUTE_DTYPES,
        help="compute and cache dtype (auto: bf16, as on TPU/GPU)",
    )
    parser.add_argument("--param_dtype", choices=DTYPES)
    parser.add_argument(
        "--compile",
        action="store_true",
        help="also compile one MoE layer on fake devices and read its costs (minutes at V2)",
    )
    args = parser.parse_args(argv)

    sizes = parse_mesh(args.mesh)
    # Fake CPU devices for the mesh, even on a GPU/TPU host; must precede the first use of a
    # jax backend.
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", math.prod(sizes.values()))
    mesh = make_mesh(**sizes)
    cfg = preset(args.preset).replace(
        capacity_factor=args.capacity_factor or None,
        dtype=args.dtype or preset(args.preset).dtype,
        param_dtype=args.param_dtype or preset(args.preset).param_dtype,
    )
    # The plan is for an accelerator run, though fake CPU devices stand in for the mesh.
    cfg = resolve_dtype(cfg, "tpu")
    batch = args.batch or 10 * rules.token_devices(mesh)
    if cfg.n_routed_experts % mesh.shape["expert"]:
        raise UserError(
            f"--mesh expert={mesh.shape['expert']} does not divide the {cfg.n_routed_experts} "
            f"routed experts of {args.preset}: give a divisor"
        )
    if batch % rules.token_devices(mesh):
        raise UserError(
            f"--batch {batch} does not split over {rules.token_devices(mesh)} devices: "
            "give a multiple"
        )

    print(
        f"{args.preset} on mesh {dict(mesh.shape)}: params {cfg.param_dtype}, compute "
        f"{cfg.dtype}, batch {batch} x {args.seq_len}, capacity factor {cfg.capacity_factor}"
    )
    print("per-device memory")
    for name, size in memory(cfg, mesh, batch, args.seq_len).items():
        print(f"  {name:44s} {size / GiB:10.2f} GiB")
    ideal = {
        "activation bytes": 2
        * expert.devices_per_token(cfg, mesh.shape["expert"])
        * cfg.hidden_size
        * jnp.dtype(cfg.dtype).itemsize,
        "expert flops": 6 * cfg.num_experts_per_tok * cfg.hidden_size * cfg.moe_intermediate_size,
    }
    print(
        "one MoE layer's routed experts, per token on one device "
        "(x cf = 2 cf M D bytes, 6 cf K D I FLOPs)"
    )
    rows = [("train step (capacity)", True), ("dropless (eval, generation)", False)]
    for label, drop in rows:
        predicted = predicted_layer_cost(cfg, mesh, batch, args.seq_len, drop)
        compiled = compiled_layer_cost(cfg, mesh, batch, args.seq_len, drop) if args.compile else {}
        for key, value in predicted.items():
            got = f"   compiled {compiled[key]:14,.0f}" if key in compiled else ""
            base = ideal.get(key) or ideal["activation bytes"]
            print(f"  {label:28s} {key:18s} planned {value:14,.0f} ({value / base:5.2f} x){got}")


if __name__ == "__main__":
    main()
