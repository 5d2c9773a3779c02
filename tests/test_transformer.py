"""The decoder as a whole: the 60-layer config compiles fast, remat and unrolling change
nothing numerically, the aux record has the documented shapes. (Packed documents: test_train.py.)"""

import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import deepseek_jax as dj


def forward(cfg, params, tokens, **kw):
    return dj.DeepSeekV2(cfg).apply({"params": params}, tokens, **kw)


def test_v2_forward_compiles_in_seconds():
    """nn.scan keeps the compiled program one layer long, whatever num_hidden_layers is."""
    cfg = dj.preset("v2")
    abstract = jax.eval_shape(lambda: dj.init_params(cfg, jax.random.key(0)))
    start = time.perf_counter()
    jax.jit(lambda p, t: forward(cfg, p, t).logits).lower(
        abstract, jax.ShapeDtypeStruct((1, 16), jnp.int32)
    ).compile()
    assert time.perf_counter() - start < 60


@pytest.fixture(scope="module")
def tiny():
    cfg = dj.preset("tiny").replace(initializer_range=0.05)
    return cfg, jax.jit(dj.init_params, static_argnums=0)(cfg, jax.random.key(0))


@pytest.mark.parametrize(
    "change",
    [
        dict(remat_policy="full"),
        dict(remat_policy="dots_with_no_batch_dims_saveable"),
        dict(scan_unroll=2),
    ],
)
def test_remat_and_unroll_keep_values_and_grads(tiny, change):
    cfg, params = tiny
    tokens = np.random.RandomState(1).randint(0, 256, (2, 16))

    def loss(p, c):
        out = forward(c, p, tokens)
        return out.logits.mean() + out.aux.total

    base_loss, base_grad = jax.value_and_grad(loss)(params, cfg)
    remat_loss, remat_grad = jax.value_and_grad(loss)(params, cfg.replace(**change))
    np.testing.assert_allclose(remat_loss, base_loss, rtol=1e-6)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-6), remat_grad, base_grad)


def test_aux_record_shapes(tiny):
    cfg, params = tiny
    out = forward(cfg, params, np.zeros((2, 8), np.int32))
    assert out.aux.load.shape == (cfg.num_moe_layers, cfg.n_routed_experts)
    np.testing.assert_allclose(out.aux.load.sum(axis=-1), 1.0, rtol=1e-6)
    assert out.aux.total > 0
    assert out.cache["moe"].shape == (cfg.num_moe_layers, 2, 8, cfg.latent_cache_dim)
