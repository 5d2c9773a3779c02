"""Per-device memory, all-to-all traffic and expert FLOPs of a training run on a mesh,
without allocating it.

    deepseek-jax-plan --config v2 --mesh data=4,fsdp=32,expert=8      # the run config's
    deepseek-jax-plan --preset v2 --mesh data=4,expert=8 --param_dtype bfloat16 --dtype bfloat16

(= python -m deepseek_jax.parallel.plan; flags as every command's, cli/parser.py; with
--config, `--config.<section>.<field>=V` overrides a field as train.py's does.)

Memory, from shapes (`train_memory`, no compile): params, their gradients and AdamW's
moments in the dtypes and ZeRO-1 shardings of the train loop's own state (`train/state.py`,
`train/optimizer.py`, `placement.py`); activations of one micro-batch under the remat
policy: the residuals each layer keeps for its backward times the layers, plus the peak of
one layer's recomputed forward and cotangents, plus the logits; and the latent cache of a
generation. `--compile` also compiles the real train step on abstract sharded inputs and
reads `memory_analysis()` (`compiled_train_memory`); the tests hold the two within 15%.

One MoE layer's routed experts are costed twice, for each dispatch (ragged_all_to_all on
TPU/GPU, the dense all_to_all on the CPU): predicted from shapes alone
(`predicted_layer_cost`: the dispatch's C or S and R, and B, from `expert.sizes`) and read
from the program: the one XLA:CPU compiles for the dense dispatch (`compiled_layer_cost`:
all-to-all result bytes and the expert dots' FLOPs, loop bodies times their trip counts,
`hlo.py`), the one exported for TPU for the ragged one (`exported_layer_cost`: its
ragged_all_to_all result bytes); the tests hold the two within 10%. Fake CPU devices stand
in for the mesh, so this runs on a laptop (and on a GPU/TPU host, where it asks for the CPU
platform). A command-line tool over the model, the rules and the train step, so it imports
them (none of them imports it).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import sys

import jax
import jax.numpy as jnp
from jax import export
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from deepseek_jax import configs
from deepseek_jax.cli import args as config_args
from deepseek_jax.cli.parser import Parser
from deepseek_jax.config import COMPUTE_DTYPES, DTYPES, PRESETS, ModelConfig, preset, resolve_dtype
from deepseek_jax.errors import UserError, report_errors
from deepseek_jax.model.attention import default_block
from deepseek_jax.model.experts import tile_rows
from deepseek_jax.model.moe import route
from deepseek_jax.model.transformer import init_cache, stacks
from deepseek_jax.parallel import expert, hlo, placement, rules
from deepseek_jax.parallel.mesh import MESH_AXES, make_mesh, parse_mesh
from deepseek_jax.train import optimizer as opt
from deepseek_jax.train import step as train_step
from deepseek_jax.train.settings import OptimizerSettings, RunConfig
from deepseek_jax.train.state import init_state

GiB = 2**30


def per_device_bytes(shapes, shardings) -> int:
    """Bytes one device holds of a tree of ShapeDtypeStructs placed by `shardings`."""
    sizes = jax.tree.map(
        lambda x, s: math.prod(s.shard_shape(x.shape)) * jnp.dtype(x.dtype).itemsize,
        shapes,
        shardings,
    )
    return sum(jax.tree.leaves(sizes))


@dataclasses.dataclass(frozen=True)
class Run:
    """What the planner costs: `cfg` trained on `mesh`, `batch` sequences of `length` tokens a
    step in `micro_steps` micro-batches (gradient accumulation), AdamW per `optimizer` (a
    config.optimizer section)."""

    cfg: ModelConfig
    mesh: Mesh
    batch: int
    length: int
    micro_steps: int
    optimizer: OptimizerSettings

    def __post_init__(self):
        # A compute dtype of "auto" resolves for the mesh's devices; the command line resolves
        # it for "tpu" first: it plans an accelerator run, fake CPU devices standing in.
        object.__setattr__(self, "cfg", resolve_dtype(self.cfg, self.mesh))

    @property
    def tokens(self) -> int:
        """Tokens one device holds of one micro-batch (n)."""
        return self.batch // self.micro_steps * self.length // rules.token_devices(self.mesh)


def train_state(run: Run):
    """(the train state as ShapeDtypeStructs, its shardings, the optimizer, its schedule): the
    train loop's own (train/optimizer.py, train/state.py, train/step.py)."""
    steps = run.optimizer.warmup_steps + 1  # any run the schedule accepts: shapes only
    optimizer = opt.make_optimizer(run.optimizer, steps)
    state = jax.eval_shape(functools.partial(init_state, run.cfg, optimizer, 0))
    shardings = train_step.state_shardings(run.cfg, run.mesh, state)
    return state, shardings, optimizer, opt.schedule(run.optimizer, steps)


def state_memory(run: Run) -> dict[str, int]:
    """Per device: params, their gradients and AdamW's moments, each in the dtype the train
    step keeps it in (the moments take the params' dtype: optax's default mu_dtype). One
    gradient copy: the step sums micro-batch gradients into an accumulator placed like the
    params, and XLA adds each into it where it is produced (measured: the compiled step's
    temporaries beyond the activations are one params-sized copy)."""
    state, shardings, _, _ = train_state(run)
    params = per_device_bytes(state.params, shardings.params)
    moments = per_device_bytes(state.opt_state, shardings.opt_state)
    dtypes = sorted({str(x.dtype) for x in jax.tree.leaves(state.opt_state) if x.ndim})
    return {
        f"params ({run.cfg.param_dtype})": params,
        f"gradients ({run.cfg.param_dtype})": params,
        f"adamw moments ({', '.join(dtypes)}, ZeRO-1)": moments,
    }


def _heads(run: Run) -> int:
    """MLA's heads on one device (the "act_heads" rule's split)."""
    return run.cfg.num_attention_heads // rules.devices(run.mesh, "act_heads")


def saved_per_layer(run: Run, moe: bool) -> int:
    """Bytes one device keeps of one layer's forward for its backward, under the remat policy
    (model/transformer.py REMAT_POLICIES): the layer's input (the scan's carry) and, on the
    plain attention path, its float32 mask [b, T, T] (hoisted out of the layer scan), plus
    what the policy saves; "none" keeps the whole forward."""
    cfg, n, a = run.cfg, run.tokens, jnp.dtype(run.cfg.dtype).itemsize
    policy = cfg.remat_policy
    kept = n * cfg.hidden_size * a
    if run.length <= (cfg.attention_block_size or default_block()):
        kept += run.tokens * run.length * 4
    if policy == "none":
        return kept + attention_forward(run) + ffn_forward(run, moe)
    if policy == "full":
        return kept
    if policy == "block_outputs":
        return kept + 2 * n * cfg.hidden_size * a  # attn_out, ffn_out
    heads = _heads(run)
    dn, dr, dv = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
    # Dots with no batch dimension: MLA's projections (eqs. 9-15, 19), the FFN's matmuls and
    # the float32 router; the routed experts run inside the dispatch's shard_map and loops,
    # whose outputs no policy names, so they are recomputed.
    mla = (cfg.q_lora_rank or 0) + heads * (2 * dn + dr + dv) + cfg.kv_lora_rank + dr
    mla += cfg.hidden_size
    if moe:
        width = cfg.moe_intermediate_size * cfg.n_shared_experts // rules.devices(run.mesh, "mlp")
        ffn = (2 * width + cfg.hidden_size) * a + cfg.n_routed_experts * 4
    else:
        width = cfg.intermediate_size // rules.devices(run.mesh, "mlp")
        ffn = (2 * width + cfg.hidden_size) * a
    kept += n * (mla * a + ffn)
    if policy == "dots_saveable":  # and attention's batched dots: scores and p . v
        kept += attention_scores(run) + n * heads * dv * a
    return kept


def attention_scores(run: Run) -> int:
    """Bytes of one layer's float32 attention scores on one device: [b, H, T, T] on the plain
    path, one [b, H, block, block] tile at a time on the blockwise one (model/attention.py)."""
    cfg, length = run.cfg, run.length
    block = cfg.attention_block_size or default_block()
    side = length if length <= block else block
    return run.tokens // length * _heads(run) * side * side * 4


def attention_forward(run: Run) -> int:
    """Bytes of MLA's forward that its backward reads: q, k [b, T, H, N + R], v and the
    output [b, T, H, V], the scores and their softmax."""
    cfg, a = run.cfg, jnp.dtype(run.cfg.dtype).itemsize
    k, v = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim, cfg.v_head_dim
    return run.tokens * _heads(run) * (2 * k + 2 * v) * a + 2 * attention_scores(run)


def ffn_forward(run: Run, moe: bool) -> int:
    """Bytes of the FFN's forward that its backward reads. Dense: the gate, up and gated
    hidden [n, I] and the output. MoE: the rows sent and received, there and back ([S, D]
    and [R, D] each way), each kept slot's x and y [B, D] and hidden [B, 3 I] (B the budget,
    in whole grouped-matmul tiles), the combined output [n, D]."""
    cfg, n, a, d = run.cfg, run.tokens, jnp.dtype(run.cfg.dtype).itemsize, run.cfg.hidden_size
    if not moe:
        return n * (3 * cfg.intermediate_size // rules.devices(run.mesh, "mlp") + d) * a
    # Planned for an accelerator: the ragged dispatch's buffers unless the config forces dense.
    ragged = cfg.dispatch != "dense"
    size = layer_sizes(cfg, run.mesh, run.batch // run.micro_steps, run.length, True, ragged)
    p = expert.expert_devices(cfg, run.mesh)
    width = cfg.moe_intermediate_size // rules.devices(run.mesh, "expert_mlp")
    experts = cfg.n_routed_experts // p
    tile = tile_rows(size.budget, experts)
    slots = (-(-size.budget // tile) + experts) * tile
    return (2 * (size.sent + size.received) * d + slots * (2 * d + 3 * width) + n * d) * a


def layer_peak(run: Run, moe: bool) -> int:
    """Bytes live while one layer's backward runs, beyond what was saved: its recomputed
    forward, and as much again in cotangents while the FFN's (then attention's) backward
    runs, attention's forward still held."""
    attention, ffn = attention_forward(run), ffn_forward(run, moe)
    return max(attention + 2 * ffn, 2 * attention)


def activation_memory(run: Run) -> dict[str, int]:
    """Per device, one micro-batch: the residuals saved across the layers, the peak of one
    layer's backward, and the head: logits, their float32 exp and gradient, the one-hot
    targets."""
    cfg, n = run.cfg, run.tokens
    saved = sum(length * saved_per_layer(run, moe) for _, moe, length in stacks(cfg))
    peak = max(layer_peak(run, moe) for _, moe, _ in stacks(cfg))
    vocab = cfg.vocab_size // rules.devices(run.mesh, "act_vocab")
    head = n * vocab * (jnp.dtype(cfg.dtype).itemsize + 3 * 4)
    return {
        f"activations saved by remat, {cfg.num_hidden_layers} layers": saved,
        "one layer's backward (recompute + cotangents)": peak,
        "logits and their gradient": head,
    }


def train_memory(run: Run) -> dict[str, int]:
    """The train step's memory on one device from shapes (no compile), by part."""
    fields = 5 * run.batch * run.length * 4 // rules.token_devices(run.mesh)
    return {**state_memory(run), **activation_memory(run), "batch (5 int32/f32 fields)": fields}


def cache_memory(cfg: ModelConfig, mesh: Mesh, batch: int, length: int) -> dict[str, int]:
    """The latent cache of a generation of `batch` rows up to `length` tokens, per device."""
    cache = jax.eval_shape(lambda: init_cache(cfg, batch, length))
    return {
        f"latent cache (B {batch}, S {length}, {cfg.dtype})": per_device_bytes(
            cache, placement.cache_shardings(mesh, cache)
        )
    }


def compiled_train_memory(run: Run) -> dict[str, int]:
    """The train step XLA compiles for `run` on abstract sharded inputs, read from its
    memory_analysis(): arguments (state, batch), outputs (state, metrics), temporaries, and
    the bytes outputs share with donated arguments (the state, updated in place). "total" =
    arguments + outputs + temporaries - aliased: what one device must hold."""
    state, shardings, optimizer, schedule = train_state(run)
    step = train_step.make_train_step(
        run.cfg, optimizer, schedule, run.mesh, shardings, run.micro_steps
    )
    state = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings
    )
    sharding = rules.batch_sharding(run.mesh)
    tokens = jax.ShapeDtypeStruct((run.batch, run.length), jnp.int32, sharding=sharding)
    weights = jax.ShapeDtypeStruct((run.batch, run.length), jnp.float32, sharding=sharding)
    batch = dict(inputs=tokens, targets=tokens, positions=tokens, segment_ids=tokens)
    m = step.lower(state, {**batch, "weights": weights}).compile().memory_analysis()
    out = {
        "arguments": m.argument_size_in_bytes,
        "outputs": m.output_size_in_bytes,
        "temporaries": m.temp_size_in_bytes,
        "aliased": m.alias_size_in_bytes,
    }
    out["total"] = out["arguments"] + out["outputs"] + out["temporaries"] - out["aliased"]
    return out


def layer_sizes(
    cfg: ModelConfig, mesh, batch: int, length: int, drop: bool, ragged: bool
) -> expert.Sizes:
    """The dispatch's static sizes for one MoE layer of a [batch, length] call."""
    p = expert.expert_devices(cfg, mesh)
    never_drop = expert.never_drop_tokens(cfg, batch, length)
    n = batch * length // rules.token_devices(mesh)
    protected = int(never_drop.reshape(-1, n).sum(axis=1).max())
    return expert.sizes(cfg, p, n, protected, drop, ragged)


def predicted_layer_cost(
    cfg: ModelConfig, mesh, batch: int, length: int, drop: bool, ragged: bool = False
) -> dict:
    """Per token on one device, from shapes: all-to-all bytes (token rows, and all told with
    the slot metadata; received, there and back) and routed-expert FLOPs at the grouped
    matmul's compiled bound. `ragged`: the TPU/GPU dispatch (ragged_all_to_all)."""
    cfg = resolve_dtype(cfg, mesh)
    size = layer_sizes(cfg, mesh, batch, length, drop, ragged)
    p = expert.expert_devices(cfg, mesh)
    d, k, l = cfg.hidden_size, cfg.num_experts_per_tok, cfg.n_routed_experts // p
    width = cfg.moe_intermediate_size // rules.devices(mesh, "expert_mlp")
    rows = size.received + size.sent  # the dispatch's result, then the combine's
    activations = rows * d * jnp.dtype(cfg.dtype).itemsize
    metadata = size.received * k * 3 * 4 + size.sent * k  # (expert, gate, priority), kept
    tile = tile_rows(size.budget, l)
    tiles = -(-size.budget // tile) + l
    return {
        "activation bytes": activations / size.n,
        "all-to-all bytes": (activations + metadata) / size.n,
        "expert flops": 6 * d * width * tiles * tile / size.n,
    }


def layer_program(cfg: ModelConfig, mesh, batch: int, length: int, drop: bool):
    """One MoE layer's routed experts, jitted, and abstract sharded inputs for it."""
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
    return jax.jit(routed), args


def compiled_layer_cost(cfg: ModelConfig, mesh, batch: int, length: int, drop: bool) -> dict:
    """Per token on one device, read from the program XLA:CPU compiles (the dense dispatch;
    same keys as predicted)."""
    fn, args = layer_program(cfg.replace(dispatch="dense"), mesh, batch, length, drop)
    text = fn.lower(*args).compile().as_text()
    n = batch * length / rules.token_devices(mesh)
    return {
        "activation bytes": hlo.all_to_all_bytes(text, last_dim=cfg.hidden_size) / n,
        "all-to-all bytes": hlo.all_to_all_bytes(text) / n,
        "expert flops": hlo.dot_flops(text, scope="experts") / n,
    }


def exported_layer_cost(
    cfg: ModelConfig, mesh, batch: int, length: int, drop: bool, platform: str = "tpu"
) -> dict:
    """Per token on one device, the ragged dispatch's all-to-all bytes read from the layer
    exported for `platform` (StableHLO: XLA:CPU compiles no ragged-all-to-all). The expert
    FLOPs are the dense program's: both run `expert.local_experts` at the same budget."""
    fn, args = layer_program(cfg.replace(dispatch="ragged"), mesh, batch, length, drop)
    checks = [export.DisabledSafetyCheck.custom_call("ragged_all_to_all")]
    module = export.export(fn, platforms=[platform], disabled_checks=checks)(*args)
    text = module.mlir_module()
    n = batch * length / rules.token_devices(mesh)
    return {
        "activation bytes": hlo.ragged_all_to_all_bytes(text, last_dim=cfg.hidden_size) / n,
        "all-to-all bytes": hlo.ragged_all_to_all_bytes(text) / n,
    }


def run_from_config(config: RunConfig, mesh_sizes: dict[str, int]) -> Run:
    """A Run from an experiment config (configs/*.py): its model, mesh, batch (the ramp's
    last size), sequence length, accumulation and optimizer. config.mesh.data = 0 (whatever
    the other axes leave) is 1 here, where no devices exist to fill: give --mesh."""
    sizes = {axis: getattr(config.mesh, axis) for axis in MESH_AXES} | mesh_sizes
    sizes["data"] = sizes["data"] or 1
    return Run(
        cfg=resolve_dtype(config.model, "tpu"),
        mesh=fake_mesh(sizes),
        batch=config.train.batch_size,
        length=config.data.seq_len,
        micro_steps=config.train.micro_steps,
        optimizer=config.optimizer,
    )


def fake_mesh(sizes: dict[str, int]) -> Mesh:
    """A mesh of fake CPU devices, even on a GPU/TPU host; must precede a jax backend's use."""
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", math.prod(sizes.values()))
    return make_mesh(**sizes)


def check(run: Run, name: str) -> None:
    """The planner's bad inputs, in one line each, before anything is traced."""
    cfg, mesh, splits = run.cfg, run.mesh, rules.token_devices(run.mesh)
    if cfg.n_routed_experts % mesh.shape["expert"]:
        raise UserError(
            f"--mesh expert={mesh.shape['expert']} does not divide the {cfg.n_routed_experts} "
            f"routed experts of {name}: give a divisor"
        )
    if run.batch % (run.micro_steps * splits):
        raise UserError(
            f"--batch {run.batch} in {run.micro_steps} micro-batches does not split over "
            f"{splits} devices: give a multiple of {run.micro_steps * splits}"
        )


def print_table(title: str, parts: dict[str, int]) -> None:
    print(title)
    for name, size in parts.items():
        print(f"  {name:52s} {size / GiB:10.2f} GiB")


@report_errors("deepseek-jax-plan")
def main(argv: list[str] | None = None) -> None:
    parser = Parser("deepseek-jax-plan", __doc__)
    parser.add_argument(
        "--config",
        default=None,
        metavar="NAME_OR_FILE",
        help="an experiment config (v2, v2_lite, ... or a .py file; --config.<section>.<field>=V "
        "overrides a field): its model, mesh, batch, seq_len, micro_steps and dtypes",
    )
    parser.add_argument("--preset", default=None, choices=sorted(PRESETS), help="default v2")
    parser.add_argument("--mesh", default=None, help="e.g. data=4,fsdp=2,expert=8")
    parser.add_argument(
        "--batch",
        type=int,
        default=None,
        help="sequences per step (--preset: default 10 per batch-splitting device, so that the "
        "10%% never-drop sequences are spread over the devices rather than all or nothing)",
    )
    parser.add_argument("--seq_len", type=int, default=None, help="--preset: default 4096")
    parser.add_argument("--capacity_factor", type=float, default=None, help="0 for dropless")
    parser.add_argument(
        "--dtype",
        choices=COMPUTE_DTYPES,
        help="compute and cache dtype (auto: bf16, as on TPU/GPU)",
    )
    parser.add_argument("--param_dtype", choices=DTYPES)
    parser.add_argument(
        "--compile",
        action="store_true",
        help="also compile one MoE layer and the whole train step on fake devices and read "
        "their costs and memory (minutes at V2)",
    )
    overrides, rest = config_args.split_overrides(sys.argv[1:] if argv is None else list(argv))
    args = parser.parse_args(rest)
    if args.config and args.preset:
        raise UserError("give --config or --preset, not both")
    if overrides and not args.config:
        raise UserError(f"--config.{overrides[0][0]} needs --config NAME_OR_FILE")

    mesh_sizes = parse_mesh(args.mesh) if args.mesh else {}
    if args.config:
        name = args.config
        config = configs.from_config_dict(config_args.resolve(args.config, overrides))
        run = run_from_config(config, mesh_sizes)
    else:
        name = args.preset or "v2"
        mesh = fake_mesh(mesh_sizes or {"data": 1})
        run = Run(
            cfg=resolve_dtype(preset(name), "tpu"),
            mesh=mesh,
            batch=10 * rules.token_devices(mesh),
            length=4096,
            micro_steps=1,
            optimizer=OptimizerSettings(),
        )
    capacity = run.cfg.capacity_factor
    if args.capacity_factor is not None:  # 0: dropless
        capacity = args.capacity_factor or None
    cfg = run.cfg.replace(
        capacity_factor=capacity,
        dtype=args.dtype or run.cfg.dtype,
        param_dtype=args.param_dtype or run.cfg.param_dtype,
    )
    run = dataclasses.replace(
        run, cfg=cfg, batch=args.batch or run.batch, length=args.seq_len or run.length
    )
    check(run, name)
    mesh, batch, length = run.mesh, run.batch // run.micro_steps, run.length

    print(
        f"{name} on mesh {dict(mesh.shape)}: params {cfg.param_dtype}, compute {cfg.dtype}, "
        f"batch {run.batch} x {length} in {run.micro_steps} micro-batches, remat "
        f"{cfg.remat_policy}, capacity factor {cfg.capacity_factor}"
    )
    planned = train_memory(run)
    print_table("train step, per device (from shapes)", planned)
    print(f"  {'total':52s} {sum(planned.values()) / GiB:10.2f} GiB")
    if args.compile:
        compiled = compiled_train_memory(run)
        print_table("train step, per device (compiled: memory_analysis)", compiled)
    print_table("generation, per device", cache_memory(cfg, mesh, batch, length))
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
    rows = [
        ("train step, TPU/GPU (ragged)", True, True),
        ("train step, CPU (dense)", True, False),
        ("dropless, TPU/GPU (ragged)", False, True),
        ("dropless, CPU (dense)", False, False),
    ]
    for label, drop, ragged in rows:
        predicted = predicted_layer_cost(cfg, mesh, batch, length, drop, ragged)
        compiled = {}
        if args.compile:
            cost = exported_layer_cost if ragged else compiled_layer_cost
            compiled = cost(cfg, mesh, batch, length, drop)
        for key, value in predicted.items():
            got = f"   compiled {compiled[key]:14,.0f}" if key in compiled else ""
            base = ideal.get(key) or ideal["activation bytes"]
            print(f"  {label:30s} {key:18s} planned {value:14,.0f} ({value / base:5.2f} x){got}")
    if args.compile and jnp.dtype(cfg.dtype).itemsize < 4:
        print("  (XLA:CPU converts bf16 all-to-alls to float32: the compiled dense bytes read 2x)")


if __name__ == "__main__":
    main()
