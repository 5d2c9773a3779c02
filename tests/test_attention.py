"""Blockwise attention equals the plain reference in values and gradients, never holds a
T x S array (forward or backward), and refuses a block size that does not divide the length.
(Against transformers, inside MLA: tests/test_mla.py; the whole model: tests/test_transformer.py.)"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepseek_jax.errors import UserError
from deepseek_jax.model.attention import attend, blockwise_attention, reference_attention

B, T, H, K, V = 2, 24, 3, 10, 7


def inputs(kv_heads: int, s: int = T, seed: int = 0):
    rng = np.random.RandomState(seed)
    q = jnp.asarray(rng.randn(B, T, H, K), jnp.float32)
    k = jnp.asarray(rng.randn(B, s, kv_heads, K), jnp.float32)
    v = jnp.asarray(rng.randn(B, s, kv_heads, V), jnp.float32)
    segments = jnp.asarray(np.sort(rng.randint(0, 3, (B, T)), axis=1))
    return q, k, v, segments


def value_and_grads(fn, q, k, v, **kw):
    def loss(q, k, v):
        o = fn(q, k, v, scale=0.3, **kw)
        return (o * jnp.sin(o)).sum(), o  # a non-linear loss: dO differs per element

    (_, o), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    return o, grads


@pytest.mark.parametrize("kv_heads", [H, 1], ids=["per_head", "shared"])
@pytest.mark.parametrize("packed", [False, True])
def test_blockwise_equals_reference(kv_heads, packed):
    """Per-head keys (training, prefill) or one shared head (the absorbed decode), causal,
    with and without packed segments; blocks of many shapes, square or not."""
    q, k, v, segments = inputs(kv_heads)
    kw = dict(
        q_positions_BT=jnp.broadcast_to(jnp.arange(T), (B, T)),
        segment_ids_BT=segments if packed else None,
    )
    o_ref, g_ref = value_and_grads(reference_attention, q, k, v, **kw)
    for block_q, block_k in ((8, 6), (24, 4)):
        o, g = value_and_grads(blockwise_attention, q, k, v, block_q=block_q, block_k=block_k, **kw)
        np.testing.assert_allclose(o, o_ref, atol=1e-5, rtol=0)
        for got, want in zip(g, g_ref, strict=True):
            np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    # attend pads 24 to 25 (a block of 5 divides neither) and drops what it padded.
    np.testing.assert_allclose(attend(q, k, v, scale=0.3, block=5, **kw), o_ref, atol=1e-5)


def test_decode_reads_the_cache_in_blocks():
    """Queries at their positions over a longer cache: slots after a query's position (the
    unwritten tail, skipped block by block) change nothing."""
    q, k, v, _ = inputs(1, s=40)
    positions = jnp.asarray(np.random.RandomState(1).randint(0, 40, (B, T)))
    o_ref = reference_attention(q, k, v, scale=0.3, q_positions_BT=positions)
    o = attend(q, k, v, scale=0.3, q_positions_BT=positions, block=8)
    np.testing.assert_allclose(o, o_ref, atol=1e-5, rtol=0)
    garbage = k.at[:, 39].set(1e3)  # slot 39 is after every position but the last
    last = positions == 39
    o_garbage = attend(q, garbage, v, scale=0.3, q_positions_BT=positions, block=8)
    np.testing.assert_allclose(o_garbage[~last], o[~last], atol=1e-5, rtol=0)


def shapes(jaxpr):
    for eqn in jaxpr.eqns:
        for var in eqn.outvars:
            yield tuple(getattr(var.aval, "shape", ()))
        for value in eqn.params.values():
            subs = value if isinstance(value, (tuple, list)) else (value,)
            for sub in subs:
                if isinstance(sub, jax.extend.core.ClosedJaxpr):
                    yield from shapes(sub.jaxpr)
                elif isinstance(sub, jax.extend.core.Jaxpr):
                    yield from shapes(sub)


def test_no_value_spans_queries_and_keys():
    """Forward and backward of a 256-token causal attention in blocks of 32: no value in the
    program has two axes of 256 (the plain path's [B, H, T, S] has)."""
    t = 256
    q = jnp.zeros((1, t, 2, 8))
    k, v = jnp.zeros((1, t, 2, 8)), jnp.zeros((1, t, 2, 8))
    positions = jnp.arange(t)[None]

    def loss(fn, **kw):
        return lambda q, k, v: fn(q, k, v, scale=1.0, q_positions_BT=positions, **kw).sum()

    def long_values(f):
        jaxpr = jax.make_jaxpr(jax.grad(f, argnums=(0, 1, 2)))(q, k, v).jaxpr
        return [s for s in set(shapes(jaxpr)) if s.count(t) >= 2]

    assert long_values(loss(reference_attention))  # the check can see a T x S value
    assert not long_values(loss(blockwise_attention, block_q=32, block_k=32))


def test_bad_block_size_is_refused():
    q, k, v, _ = inputs(H)
    with pytest.raises(UserError) as error:
        blockwise_attention(
            q, k, v, scale=1.0, q_positions_BT=jnp.zeros((B, T), int), block_q=8, block_k=5
        )
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith("attention block size 5 does not divide the padded key length 24")
