"""The one rules table drives every layout, on 8 fake CPU devices: change a rule and the
model's activation constraints (MLA's included) and the expert dispatch's shard_map specs
follow. `tests/test_rules.py` runs this file in a subprocess with
XLA_FLAGS=--xla_force_host_platform_device_count=8."""

import jax
import jax.numpy as jnp
import pytest
from jax.extend.core import ClosedJaxpr, Jaxpr

import deepseek_jax as dj
from deepseek_jax.parallel import rules

if jax.device_count() != 8:
    pytest.skip("needs 8 devices: run through tests/test_rules.py", allow_module_level=True)

CFG = dj.ModelConfig(
    vocab_size=64,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    q_lora_rank=16,
    kv_lora_rank=24,
    qk_nope_head_dim=8,
    qk_rope_head_dim=4,
    v_head_dim=8,
    intermediate_size=64,
    moe_intermediate_size=16,
    n_routed_experts=8,
    num_experts_per_tok=2,
    first_k_dense_replace=1,
    max_position_embeddings=32,
    rope_scaling=None,
)
B, T = 8, 16


def sub_jaxprs(value):
    """The jaxprs inside one equation parameter (a scan body, a cond's branches, ...)."""
    if isinstance(value, ClosedJaxpr):
        yield value.jaxpr
    elif isinstance(value, Jaxpr):
        yield value
    elif isinstance(value, tuple | list):
        for item in value:
            yield from sub_jaxprs(item)


def layouts(jaxpr):
    """(shape, spec) of every sharding constraint and ("shard_map", in_specs) of every
    shard_map in a traced program, nested ones included; specs as full-rank tuples."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "sharding_constraint":
            shape = eqn.invars[0].aval.shape
            spec = tuple(eqn.params["sharding"].spec)
            yield shape, spec + (None,) * (len(shape) - len(spec))
        elif eqn.primitive.name == "shard_map":
            yield "shard_map", tuple(tuple(s) for s in eqn.params["in_specs"])
        for value in eqn.params.values():
            for sub in sub_jaxprs(value):
                yield from layouts(sub)


def traced_layouts(train: bool):
    """Layouts of the model's forward on a (data 2, expert 4) mesh, read from its jaxpr (the
    backward's shard_map gets its specs from JAX's transpose, not from the table)."""
    mesh = dj.make_mesh(data=2, expert=4)
    params = jax.eval_shape(lambda: dj.init_params(CFG, jax.random.key(0)))
    tokens = jax.ShapeDtypeStruct((B, T), jnp.int32)

    def loss(params, tokens):
        out = dj.DeepSeekV2(CFG, mesh=mesh).apply({"params": params}, tokens, train=train)
        return out.logits.mean()

    return list(layouts(jax.make_jaxpr(loss)(params, tokens).jaxpr))


def mla_layouts(found) -> dict[str, set]:
    """Constraints of MLA's per-head arrays [B, T, H, *] and its latent c_KV [B, T, C]."""
    h, c = CFG.num_attention_heads, CFG.kv_lora_rank
    return {
        "per head": {spec for shape, spec in found if len(shape) == 4 and shape[2] == h},
        "latent": {spec for shape, spec in found if shape == (B, T, c)},
    }


def dispatch_rows(found) -> set:
    """The token rows' spec of each expert-parallel shard_map (its first input)."""
    return {specs[0] for kind, specs in found if kind == "shard_map"}


def test_mla_and_dispatch_layouts_follow_the_rules_table(monkeypatch):
    found = traced_layouts(train=True)
    tokens = ("data", "fsdp", "expert")
    assert mla_layouts(found) == {
        "per head": {(tokens, None, "tensor", None)},
        "latent": {(tokens, None, None)},
    }
    assert dispatch_rows(found) == {(tokens,)}

    # Tokens off "expert" (the expert devices repeat each other's attention), heads onto it.
    monkeypatch.setitem(rules.TABLE, "batch", ("data", "fsdp"))
    monkeypatch.setitem(rules.TABLE, "act_heads", ("expert",))
    found = traced_layouts(train=True)
    assert mla_layouts(found) == {
        "per head": {(("data", "fsdp"), None, "expert", None)},
        "latent": {(("data", "fsdp"), None, None)},
    }
    assert dispatch_rows(found) == {(("data", "fsdp"),)}
