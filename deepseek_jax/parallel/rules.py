"""The one logical-axis rules table: every parameter, optimizer state, cache and activation
gets its sharding from `RULES` (docs/design.md 5: one rules table for the whole model).

Model code names array axes logically ("embed", "heads", "expert", ...); `RULES` maps each
name to mesh axes. As in jax-llm-examples' ShardingRules, an array whose logical axes would
put one mesh axis on two of its dimensions is refused: that layout is never what one means.

Parameter logical names come from the model's `nn.with_logical_partitioning` annotations;
activation and cache names are used only here and by callers of the helpers below.

A leaf: it imports nothing from the package, so the model may ask it for activation and
expert-dispatch specs. Placing whole trees (params, optimizer moments, the cache), which needs
the model's tree, is `placement.py`'s job.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

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
    # Inside MLA (model/mla.py): queries, keys, values and the attention output [B, T, H, *]
    # split their heads like the weights that make them (Megatron), the latent c_KV [B, T, C]
    # is whole on every device of its rows (each head's W_UK reads all of it).
    ("act_heads", ("tensor",)),
    ("act_head_dim", ()),
    ("act_kv_lora", ()),
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


def devices(mesh: Mesh, logical: str) -> int:
    """How many ways the rules split the logical axis `logical` on `mesh`."""
    return math.prod(mesh.shape[axis] for axis in TABLE[logical])


def token_devices(mesh: Mesh) -> int:
    """How many ways the tokens split: the product of the token axes' sizes on `mesh`."""
    return devices(mesh, "batch")


def constrain(x: jax.Array, mesh: Mesh | None, logical: Sequence[str | None]) -> jax.Array:
    """x laid out as the rules place `logical` on `mesh` (nothing without a mesh)."""
    if mesh is None:
        return x
    return jax.lax.with_sharding_constraint(x, activation_sharding(mesh, logical))


def activation_sharding(mesh: Mesh, logical: Sequence[str | None]) -> NamedSharding:
    """E.g. ("batch", "length") for tokens [B, T], ("batch", "length", "act_vocab") for logits."""
    return NamedSharding(mesh, spec(logical))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Tokens, positions, segment ids, targets: [B, T] split on the batch."""
    return activation_sharding(mesh, ("batch", "length"))
