"""The Pallas kernels (deepseek_jax/kernels/), run in interpret mode on the CPU, against the
model's plain paths: values and gradients, through the model's own modules and call sites.

The shapes are the smallest the TPU kernels take: 128 positions (one splash block), head dims
of V2 (dn 128 + dr 64 = 192 for q/k, dv 128: the mismatch splash must handle), expert widths
of 128 (one megablox tile), a cache of 256 slots (two decode blocks).
"""

import contextlib
import io

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import deepseek_jax as dj
from deepseek_jax.errors import UserError
from deepseek_jax.kernels.decode import pallas_latent_decode
from deepseek_jax.model.mla import MLA
from deepseek_jax.model.moe import MoE
from deepseek_jax.model.rope import rope_cos_sin
from deepseek_jax.model.transformer import REMAT_POLICIES, Block

CFG = dj.ModelConfig(
    vocab_size=128,
    hidden_size=128,
    num_hidden_layers=2,
    num_attention_heads=2,
    q_lora_rank=None,
    kv_lora_rank=64,
    qk_nope_head_dim=128,
    qk_rope_head_dim=64,
    v_head_dim=128,
    intermediate_size=128,
    moe_intermediate_size=128,
    n_routed_experts=4,
    n_shared_experts=1,
    num_experts_per_tok=2,
    topk_method="greedy",
    n_group=1,
    topk_group=1,
    routed_scaling_factor=1.0,
    first_k_dense_replace=1,
    max_position_embeddings=512,
    rope_scaling=None,
    initializer_range=0.05,
)
B, T = 2, 128


def packed_inputs():
    """x [B, T, D], positions restarting at each document, and the documents' segment ids."""
    rng = np.random.RandomState(0)
    x = jnp.asarray(rng.randn(B, T, CFG.hidden_size).astype(np.float32))
    segments = np.zeros((B, T), np.int32)
    segments[0, 50:] = 1  # row 0 packs two documents
    segments[0, 90:] = 2
    positions = np.concatenate([np.arange(50), np.arange(40), np.arange(38)])
    positions = np.stack([positions, np.arange(T)])
    return x, jnp.asarray(positions), jnp.asarray(segments)


def test_splash_attention_equals_plain_mla_values_and_grads():
    """Training attention (packed documents) through MLA: kernels='interpret' vs 'plain'."""
    x, positions, segments = packed_inputs()
    cos, sin = rope_cos_sin(CFG, positions)
    params = jax.jit(MLA(CFG).init)(jax.random.key(1), x, cos, sin, positions, segments)["params"]

    def loss(kernels):
        def f(p, x):
            mla = MLA(CFG.replace(kernels=kernels))
            out, _ = mla.apply({"params": p}, x, cos, sin, positions, segments)
            return jnp.sum(out * jnp.cos(out)), out  # a loss whose gradient is not uniform

        return jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))

    (_, out_k), grads_k = loss("interpret")(params, x)
    (_, out_p), grads_p = loss("plain")(params, x)
    np.testing.assert_allclose(out_k, out_p, atol=2e-5, rtol=1e-4)
    for g_k, g_p in zip(jax.tree.leaves(grads_k), jax.tree.leaves(grads_p), strict=True):
        np.testing.assert_allclose(g_k, g_p, atol=1e-4 * float(jnp.abs(g_p).max()), rtol=1e-3)


def test_megablox_gmm_equals_plain_moe_values_and_grads():
    """Routed experts through MoE (B*T > the per-expert decode path's tokens): gmm vs the tiled plain."""
    x = jnp.asarray(np.random.RandomState(2).randn(B, 64, CFG.hidden_size).astype(np.float32))
    params = jax.jit(MoE(CFG).init)(jax.random.key(3), x)["params"]

    def f(kernels):
        def loss(p, x):
            y, aux = MoE(CFG.replace(kernels=kernels)).apply({"params": p}, x)
            return jnp.sum(y * jnp.cos(y)), y

        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))

    (_, y_k), grads_k = f("interpret")(params, x)
    (_, y_p), grads_p = f("plain")(params, x)
    np.testing.assert_allclose(y_k, y_p, atol=1e-5, rtol=1e-4)
    for g_k, g_p in zip(jax.tree.leaves(grads_k), jax.tree.leaves(grads_p), strict=True):
        np.testing.assert_allclose(g_k, g_p, atol=1e-5 * float(jnp.abs(g_p).max()), rtol=1e-4)


def test_latent_decode_kernel_equals_plain_absorbed_mla():
    """One decode step through MLA's absorbed form: rows at different lengths, one of them
    inside the first block (the second block is skipped), one in the second."""
    s = 256
    rng = np.random.RandomState(4)
    cache = jnp.asarray(rng.randn(B, s, CFG.latent_cache_dim).astype(np.float32))
    x = jnp.asarray(rng.randn(B, 1, CFG.hidden_size).astype(np.float32))
    positions = jnp.array([[37], [200]])
    cos, sin = rope_cos_sin(CFG, positions)
    init = jax.jit(MLA(CFG).init)
    params = init(jax.random.key(5), x, cos, sin, positions, None, cache)["params"]

    def step(kernels):
        mla = MLA(CFG.replace(kernels=kernels))
        return jax.jit(lambda p: mla.apply({"params": p}, x, cos, sin, positions, None, cache))

    out_k, cache_k = step("interpret")(params)
    out_p, cache_p = step("plain")(params)
    np.testing.assert_allclose(out_k, out_p, atol=1e-5, rtol=1e-4)
    np.testing.assert_array_equal(cache_k, cache_p)


def test_latent_decode_kernel_reads_only_live_slots():
    """Slots at or past a row's length do not count, whatever (finite) they hold."""
    h, l, s = 8, CFG.latent_cache_dim, 256
    rng = np.random.RandomState(6)
    q = jnp.asarray(rng.randn(B, h, l).astype(np.float32))
    cache = rng.randn(B, s, l).astype(np.float32)
    lengths = np.array([1, 129])
    for b, n in enumerate(lengths):
        cache[b, n:] = 1e6
    out = pallas_latent_decode(
        q, jnp.asarray(cache), jnp.asarray(lengths), scale=0.1, interpret=True
    )
    for b, n in enumerate(lengths):
        live = cache[b, :n]
        p = jax.nn.softmax(0.1 * q[b] @ live.T, axis=-1)
        np.testing.assert_allclose(out[b], p @ live, atol=1e-5, rtol=1e-4)


def test_forced_kernel_on_the_wrong_platform_is_one_line():
    x, positions, segments = packed_inputs()
    cos, sin = rope_cos_sin(CFG, positions)
    mla = MLA(CFG.replace(kernels="tpu"))
    params = jax.jit(MLA(CFG).init)(jax.random.key(1), x, cos, sin, positions, segments)["params"]

    def out(p):
        return mla.apply({"params": p}, x, cos, sin, positions, segments)[0]

    # The gradient too: a train step with a forced kernel fails in the same line.
    for fn in (out, jax.grad(lambda p: jnp.sum(out(p)))):
        with pytest.raises(UserError) as e:
            jax.jit(fn)(params)
        message = str(e.value)
        assert "\n" not in message
        assert "kernel attention (kernels='tpu') cannot run on the cpu platform" in message
        assert "kernels='auto'" in message


def test_forced_kernel_on_unfit_shapes_is_one_line():
    t = 100  # splash needs whole blocks of 128 positions
    x = jnp.zeros((1, t, CFG.hidden_size))
    positions = jnp.arange(t)[None]
    cos, sin = rope_cos_sin(CFG, positions)
    mla = MLA(CFG.replace(kernels="interpret"))
    with pytest.raises(UserError) as e:
        mla.init(jax.random.key(0), x, cos, sin, positions)
    message = str(e.value)
    assert "\n" not in message
    assert (
        "kernel attention (kernels='interpret') cannot take q of shape (1, 100, 2, 192)" in message
    )
    assert "T=100" in message and "kernels='auto'" in message


def test_auto_falls_back_to_plain_on_unfit_shapes():
    """kernels='auto' with shapes no kernel takes traces and runs the plain path."""
    t = 100
    x = jnp.asarray(np.random.RandomState(7).randn(1, t, CFG.hidden_size).astype(np.float32))
    positions = jnp.arange(t)[None]
    cos, sin = rope_cos_sin(CFG, positions)
    params = jax.jit(MLA(CFG).init)(jax.random.key(0), x, cos, sin, positions)["params"]
    out = {
        k: jax.jit(MLA(CFG.replace(kernels=k)).apply)({"params": params}, x, cos, sin, positions)[0]
        for k in ("auto", "plain")
    }
    np.testing.assert_array_equal(out["auto"], out["plain"])


def test_kernels_config_value_is_checked():
    with pytest.raises(ValueError, match="kernels='triton': choose one of"):
        CFG.replace(kernels="triton")


def test_block_outputs_remat_saves_the_named_outputs_and_keeps_the_gradients():
    """remat_policy="block_outputs" on one block: the same gradients as no remat, and of
    what the block computes the backward keeps only the named MLA output (the FFN's, also
    named, is the block's output: the next block's input, kept by the layer scan)."""
    cfg = CFG.replace(hidden_size=64, n_routed_experts=4, kernels="plain")
    x = jnp.asarray(np.random.RandomState(8).randn(2, 16, 64).astype(np.float32))
    positions = jnp.broadcast_to(jnp.arange(16), (2, 16))
    cos, sin = rope_cos_sin(cfg, positions)
    plain = Block(cfg, moe=False)
    remat = nn.remat(Block, policy=REMAT_POLICIES["block_outputs"], prevent_cse=False)(cfg, False)
    params = jax.jit(plain.init)(jax.random.key(0), x, cos, sin, positions, None, None)

    def loss(block):
        return lambda p, x: jnp.sum(jnp.sin(block.apply(p, x, cos, sin, positions, None, None)[0]))

    g_remat = jax.jit(jax.grad(loss(remat), argnums=(0, 1)))(params, x)
    g_plain = jax.jit(jax.grad(loss(plain), argnums=(0, 1)))(params, x)
    for a, b in zip(jax.tree.leaves(g_remat), jax.tree.leaves(g_plain), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5)

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        jax.ad_checkpoint.print_saved_residuals(loss(remat), params, x)
    inside = [line for line in printed.getvalue().splitlines() if "deepseek_jax/model" in line]
    assert len(inside) == 1 and "named 'attn_out'" in inside[0], inside
