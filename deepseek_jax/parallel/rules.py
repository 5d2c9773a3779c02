"""The one logical-axis rules table: every parameter, optimizer state, cache and activation
gets its sharding from `RULES` (docs/design.md 5: one rules table for the whole model).

Model code names array axes logically ("embed", "heads", "expert", ...); `RULES` maps each
name to mesh axes. As in jax-llm-examples' ShardingRules, an array whose logical axes would
put one mesh axis on two of its dimensions is refused: that layout is never what one means.

Parameter logical names come from the model's `nn.with_logical_partitioning` annotations;
activation and cache names are used only here and by callers of the helpers below.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import jax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from deepseek_jax.config import ModelConfig

RULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    # Parameters
    ("vocab", ("tensor",)),
    ("embed", ("fsdp",)),  # ZeRO-3: every matrix split on D, gathered where it is used
    ("q_lora", ()),  # w_uq is (q_lora, heads, head_dim) and heads already takes "tensor"
    ("kv_lora", ()),
    ("heads", ("tensor",)),
    ("head_dim", ()),
    ("mlp", ("tensor",)),
    ("expert", ("expert",)),
    ("expert_mlp", ("tensor",)),
    ("expert_route", ()),  # every device scores every expert for its own tokens
    ("layers", ()),
    # Activations and the latent cache. The batch is split over "expert" as well: outside the
    # MoE the expert devices would otherwise repeat each other's attention.
    ("batch", ("data", "fsdp", "expert")),
    ("length", ()),
    ("act_embed", ()),
    ("act_vocab", ("tensor",)),
    ("cache_length", ()),
    ("latent", ()),
)
TABLE = dict(RULES)


def spec(logical: Sequence[str | None]) -> P:
    """Logical axis names of one array -> its PartitionSpec; None means replicated."""
    used: dict[str, str] = {}
    out = []
    for name in logical:
        if name is None:
            out.append(None)
            continue
        if name not in TABLE:
            raise ValueError(
                f"logical axis {name!r} has no rule: add it to RULES in {__name__} "
                f"(known: {sorted(TABLE)})"
            )
        for axis in TABLE[name]:
            if axis in used:
                raise ValueError(
                    f"logical axes {used[axis]!r} and {name!r} of one array {tuple(logical)} both "
                    f"map to mesh axis {axis!r}: change one of their rules in RULES"
                )
            used[axis] = name
        mesh_axes = TABLE[name]
        out.append(mesh_axes[0] if len(mesh_axes) == 1 else (mesh_axes or None))
    return P(*out)


def token_axes() -> tuple[str, ...]:
    """The mesh axes that split tokens (the "batch" rule)."""
    return TABLE["batch"]


def param_specs(cfg: ModelConfig) -> dict:
    """The params tree with each leaf replaced by its PartitionSpec over mesh axes."""
    # Imported here: the model imports parallel.expert, so parallel cannot import the model
    # at module level.
    from deepseek_jax.model.transformer import logical_axes  # noqa: PLC0415

    return jax.tree.map(spec, logical_axes(cfg), is_leaf=lambda x: isinstance(x, P))


def param_shardings(cfg: ModelConfig, mesh: Mesh) -> dict:
    """A tree of NamedSharding matching the params tree."""
    return jax.tree.map(
        lambda s: NamedSharding(mesh, s), param_specs(cfg), is_leaf=lambda x: isinstance(x, P)
    )


def shard_params(cfg: ModelConfig, params: dict, mesh: Mesh) -> dict:
    """Places a params tree on `mesh` by the rules table."""
    return jax.device_put(params, param_shardings(cfg, mesh))


def zero1_spec(shape: Sequence[int], param_spec: P, axis_sizes: Mapping[str, int]) -> P:
    """The PartitionSpec of one optimizer moment: its parameter's, plus ZeRO-1.

    The gradient is the same on every device of a token axis (the "batch" rule) that does not
    split its parameter, so the moments, touched only elementwise in the update, need not be
    stored there more than once: each such axis is added to the dimension with the most
    elements per shard that it divides. DeepSeek-V2 trains with ZeRO-1 data parallelism (paper
    3.2.2); for V2 on (data 2, fsdp 4, expert 8) it takes AdamW's moments from 94 to 27 GiB a
    device (`python -m deepseek_jax.parallel.plan`).
    """
    dims = [_axes(entry) for entry in param_spec] + [()] * (len(shape) - len(param_spec))
    used = {axis for entry in dims for axis in entry}
    for axis in token_axes():
        size = axis_sizes[axis]
        if size == 1 or axis in used:
            continue
        per_shard = [
            n // math.prod(axis_sizes[a] for a in d) for n, d in zip(shape, dims, strict=True)
        ]
        fits = [i for i, n in enumerate(per_shard) if n % size == 0]
        if fits:
            i = max(fits, key=lambda i: per_shard[i])
            dims[i] += (axis,)
    return P(*(d[0] if len(d) == 1 else (d or None) for d in dims))


def _axes(entry) -> tuple[str, ...]:
    """One PartitionSpec entry (None, "fsdp" or ("fsdp", "data")) as a tuple of mesh axes."""
    if entry is None:
        return ()
    return (entry,) if isinstance(entry, str) else tuple(entry)


def opt_state_shardings(cfg: ModelConfig, mesh: Mesh, opt_state):
    """Shardings for an optax state (arrays or ShapeDtypeStructs).

    optax states hold copies of the params tree (AdamW's mu and nu): each such subtree is
    placed like the params, then split further over the token axes by `zero1_spec`;
    everything else (step counts, scalars) is replicated.
    """
    specs = param_specs(cfg)
    params_def = jax.tree.structure(specs, is_leaf=lambda x: isinstance(x, P))

    def mirrors_params(node) -> bool:
        return isinstance(node, dict) and jax.tree.structure(node) == params_def

    def moments(tree):
        return jax.tree.map(
            lambda x, s: NamedSharding(mesh, zero1_spec(x.shape, s, mesh.shape)),
            tree,
            specs,
            is_leaf=lambda x: isinstance(x, P),
        )

    replicated = NamedSharding(mesh, P())
    return jax.tree.map(
        lambda node: moments(node) if mirrors_params(node) else replicated,
        opt_state,
        is_leaf=mirrors_params,
    )


def cache_shardings(mesh: Mesh, cache: dict) -> dict:
    """The latent cache {"dense"|"moe": [L, B, S, C+R]}: split on the batch."""
    sharding = NamedSharding(mesh, spec(("layers", "batch", "cache_length", "latent")))
    return jax.tree.map(lambda _: sharding, cache)


def activation_sharding(mesh: Mesh, logical: Sequence[str | None]) -> NamedSharding:
    """E.g. ("batch", "length") for tokens [B, T], ("batch", "length", "act_vocab") for logits."""
    return NamedSharding(mesh, spec(logical))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Tokens, positions, segment ids, targets: [B, T] split on the batch."""
    return activation_sharding(mesh, ("batch", "length"))
