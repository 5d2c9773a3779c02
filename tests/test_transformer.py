"""The decoder as a whole: the 60-layer config compiles fast, remat and unrolling change
nothing numerically, the aux record has the documented shapes. (Packed documents: test_train.py.)"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import deepseek_jax as dj
from deepseek_jax import config
from deepseek_jax.errors import UserError
from deepseek_jax.model import transformer


def forward(cfg, params, tokens, **kw):
    return dj.DeepSeekV2(cfg).apply({"params": params}, tokens, **kw)


def test_v2_forward_is_one_layer_long():
    """nn.scan keeps the program one layer long, whatever num_hidden_layers is: V2's 60 layers
    lower to as many dots as 3 do (a structural check, not a wall-clock bound)."""

    def dots(layers: int) -> int:
        cfg = dj.preset("v2").replace(num_hidden_layers=layers)
        abstract = jax.eval_shape(lambda: dj.init_params(cfg, jax.random.key(0)))
        lowered = jax.jit(lambda p, t: forward(cfg, p, t).logits).lower(
            abstract, jax.ShapeDtypeStruct((1, 16), jnp.int32)
        )
        return lowered.as_text().count("dot_general")

    assert dots(60) == dots(3) > 0


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


def packed(rng, b: int, t: int):
    """Segment ids [B, T] of a few documents per row and positions restarting at each."""
    segments = np.sort(rng.randint(0, 3, (b, t)), axis=1)
    starts = np.maximum.accumulate(
        np.where(np.diff(segments, prepend=-1, axis=1) != 0, np.arange(t), 0), axis=1
    )
    return segments, np.arange(t) - starts


def test_attention_in_blocks_keeps_values_and_grads(tiny):
    """YaRN on, packed documents, 64 tokens: blocks of 16 (and the causal blocks they skip)
    give the plain path's logits, losses and gradients to 1e-5 (fp32; gradients relative to
    their largest entry)."""
    cfg, params = tiny
    cfg = cfg.replace(
        rope_scaling=dj.YarnConfig(
            factor=4.0, original_max_position_embeddings=16, mscale=0.8, mscale_all_dim=0.6
        )
    )
    rng = np.random.RandomState(2)
    tokens = rng.randint(0, 256, (2, 64))
    segments, positions = packed(rng, 2, 64)
    weights = jnp.asarray(rng.randn(2, 64, cfg.vocab_size), jnp.float32)

    def loss(p, c):
        out = forward(c, p, tokens, positions_BT=positions, segment_ids_BT=segments)
        return (out.logits * weights).sum() + out.aux.total, out.logits

    grad = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)
    (plain_loss, plain_logits), plain_grad = grad(params, cfg)
    (block_loss, block_logits), block_grad = grad(params, cfg.replace(attention_block_size=16))
    np.testing.assert_allclose(block_logits, plain_logits, atol=1e-5, rtol=0)
    np.testing.assert_allclose(block_loss, plain_loss, rtol=1e-5)
    # Each gradient to 1e-5 of its largest entry (the loss sums 32K weighted logits).
    errors = jax.tree.map(
        lambda x, y: np.abs(x - y).max() / np.abs(y).max(), block_grad, plain_grad
    )
    assert max(jax.tree.leaves(errors)) < 1e-5, errors


def test_sequence_past_the_context_is_refused(tiny):
    cfg, params = tiny
    with pytest.raises(UserError) as error:
        forward(cfg.replace(max_position_embeddings=8), params, np.zeros((1, 9), np.int32))
    assert str(error.value) == (
        "a sequence of 9 tokens is longer than max_position_embeddings=8: shorten it, or use a "
        "config with a longer context (rope_scaling / YaRN)"
    )


def test_every_remat_policy_name_has_a_policy():
    """config.py (data, no jax) validates the names; the model maps each to a jax policy ("none":
    no remat at all). The two lists must name the same policies."""
    assert set(config.REMAT_POLICIES) == {"none", *transformer.REMAT_POLICIES}
