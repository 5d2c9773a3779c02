"""The balance losses (paper 2.2.3) count real tokens only: padding is out of f and P, each
sequence's T is its count of real tokens, and an all-padding sequence is out of the mean."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import deepseek_jax as dj
from deepseek_jax.data import chat, packing
from deepseek_jax.data.tokenizers import ByteTokenizer
from deepseek_jax.model.moe import balance_losses, route
from deepseek_jax.train.step import forward

CFG = dj.preset("tiny").replace(
    num_hidden_layers=2, aux_loss_alpha1=0.003, aux_loss_alpha2=0.05, aux_loss_alpha3=0.02
)


def by_hand(cfg, scores, experts, mask_BT):
    """The paper's equations (23)-(31), token by token, over the real tokens only."""
    e, k, g, m = cfg.n_routed_experts, cfg.num_experts_per_tok, cfg.n_group, cfg.topk_group
    per_group = e // g
    b, t = mask_BT.shape
    scores, experts = scores.reshape(b, t, e), experts.reshape(b, t, k)
    losses, load = [], np.zeros(e)
    for s in range(b):
        real = [i for i in range(t) if mask_BT[s, i]]
        if not real:
            continue
        f = (
            np.array([sum(j in experts[s, i] for i in real) for j in range(e)])
            * e
            / (k * len(real))
        )
        p = np.array([sum(scores[s, i, j] for i in real) for j in range(e)]) / len(real)
        f_dev = [f[d * per_group : (d + 1) * per_group].mean() for d in range(g)]
        p_dev = [p[d * per_group : (d + 1) * per_group].sum() for d in range(g)]
        reach = [
            sum(any(j // per_group == d for j in experts[s, i]) for i in real) for d in range(g)
        ]
        f_com = np.array(reach) * g / (m * len(real))
        losses.append((f @ p, np.dot(f_dev, p_dev), np.dot(f_com, p_dev)))
        for i in real:
            load[experts[s, i]] += 1
    exp, dev, com = np.mean(losses, axis=0)
    return {
        "expert_loss": cfg.aux_loss_alpha1 * exp,
        "device_loss": cfg.aux_loss_alpha2 * dev,
        "comm_loss": cfg.aux_loss_alpha3 * com,
        "load": load / load.sum(),
    }


def test_padding_is_out_of_f_and_p_by_hand():
    b, t, d = 3, 6, CFG.hidden_size
    x = jax.random.normal(jax.random.key(0), (b * t, d))
    centroids = jax.random.normal(jax.random.key(1), (d, CFG.n_routed_experts)) * 0.1
    routing = route(CFG, x, centroids)
    mask = np.array([[1] * 6, [1, 1, 1, 0, 0, 0], [0] * 6], np.float32)  # full, half, padding
    got = balance_losses(CFG, routing, b, jnp.asarray(mask.reshape(-1)))
    want = by_hand(CFG, np.asarray(routing.scores), np.asarray(routing.experts), mask)
    for key, value in want.items():
        np.testing.assert_allclose(got[key], value, rtol=1e-5, err_msg=key)
    # No mask: every token is real.
    ones = np.ones_like(mask)
    unmasked = balance_losses(CFG, routing, b)
    want = by_hand(CFG, np.asarray(routing.scores), np.asarray(routing.experts), ones)
    for key, value in want.items():
        np.testing.assert_allclose(unmasked[key], value, rtol=1e-5, err_msg=key)


@jax.jit
def aux_of(params, tokens_BT, token_mask_BT):
    return dj.DeepSeekV2(CFG).apply({"params": params}, tokens_BT, token_mask_BT=token_mask_BT).aux


def test_padded_sequence_has_the_losses_of_its_real_prefix():
    """Causal attention: the prefix's routing is the same with or without the padding after
    it, so with the mask the losses are those of the prefix alone."""
    params = dj.init_params(CFG, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(2), (2, 12), 1, 256)
    mask = jnp.array([[1] * 8 + [0] * 4, [1] * 8 + [0] * 4], jnp.float32)
    padded = aux_of(params, tokens, mask)
    prefix = aux_of(params, tokens[:, :8], None)
    unmasked = aux_of(params, tokens, jnp.ones_like(mask))  # the same program as `padded`
    for key in ("expert_loss", "device_loss", "comm_loss", "load"):
        np.testing.assert_allclose(getattr(padded, key), getattr(prefix, key), rtol=1e-5)
    assert float(unmasked.expert_loss) != pytest.approx(float(prefix.expert_loss), rel=1e-4)


def test_sft_rows_carry_the_padding_mask_to_the_balance_losses():
    """A chat row end to end: whatever the padding's tokens, the balance losses are the same
    (prompt tokens count: they run through the experts like the reply's)."""
    conv = chat.render(
        ByteTokenizer(), [{"role": "user", "content": "2+2"}, {"role": "assistant", "content": "4"}]
    )
    tokens, segments, masks, real = chat.pack([conv], seq_len=len(conv[0]) + 7)
    ex = packing.example(tokens[0], segments[0], masks[0], real[0])
    assert ex["token_mask"].tolist() == [1.0] * len(conv[0]) + [0.0] * 7
    params = dj.init_params(CFG, jax.random.key(0))
    batch = {key: value[None] for key, value in ex.items()}
    other = dict(batch, inputs=np.where(batch["token_mask"] > 0, batch["inputs"], 200))
    aux = jax.jit(lambda p, b: forward(CFG, p, b).aux)
    a, b = aux(params, batch), aux(params, other)
    np.testing.assert_allclose(a.expert_loss, b.expert_loss, rtol=1e-6)
    np.testing.assert_allclose(a.comm_loss, b.comm_loss, rtol=1e-6)
    without = aux(params, {k: v for k, v in other.items() if k != "token_mask"})
    assert float(without.expert_loss) != pytest.approx(float(a.expert_loss), rel=1e-4)


def test_grpo_forward_passes_its_padding_mask():
    from deepseek_jax.rl import objective

    params = dj.init_params(CFG, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(3), (2, 12), 1, 256)
    real = jnp.broadcast_to(jnp.arange(12) < 8, (2, 12))
    logprobs = jax.jit(
        lambda p, x, m: objective.answer_logprobs(CFG, p, x, jnp.array([4, 4]), 4, None, m)
    )
    _, out = logprobs(params, tokens, real)
    prefix = aux_of(params, tokens[:, :8], None)
    np.testing.assert_allclose(out.aux.expert_loss, prefix.expert_loss, rtol=1e-5)
