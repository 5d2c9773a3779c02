"""GRPO's pieces: group-normalised advantages, the KL estimator, the clipped objective."""

import jax
import jax.numpy as jnp
import numpy as np

from deepseek_jax.rl.objective import group_advantages, grpo_loss, kl_to_reference


def test_advantages_zero_mean_unit_std_per_group():
    rewards = jnp.array([[1.0, 0.0, 0.0, 1.0, 1.0], [0.2, 0.9, 0.4, 0.1, 0.3]])
    adv = np.asarray(group_advantages(rewards))
    np.testing.assert_allclose(adv.mean(axis=1), 0.0, atol=1e-6)
    np.testing.assert_allclose(adv.std(axis=1), 1.0, atol=1e-5)
    assert (np.argsort(adv[1]) == np.argsort(np.asarray(rewards[1]))).all()


def test_equal_rewards_give_zero_advantage():
    adv = group_advantages(jnp.array([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0], [0.0, 1.0, 0.0]]))
    np.testing.assert_array_equal(np.asarray(adv[:2]), 0.0)
    assert np.abs(np.asarray(adv[2])).sum() > 0


def test_kl_and_its_gradient_vanish_at_the_reference():
    logp = jnp.log(jnp.array([[0.1, 0.5, 0.9]]))
    np.testing.assert_allclose(kl_to_reference(logp, logp), 0.0, atol=1e-7)
    grad = jax.grad(lambda lp: kl_to_reference(lp, logp).sum())(logp)
    np.testing.assert_allclose(grad, 0.0, atol=1e-7)
    assert (kl_to_reference(logp, logp - 0.3) > 0).all()


def test_objective_gradient_follows_the_advantage():
    """At pi = pi_old = pi_ref the loss gradient is -A/|o| per token: rewarded answers up."""
    logp = jnp.log(jnp.full((2, 3), 0.5))
    adv = jnp.array([1.0, -1.0])
    mask = jnp.array([[1, 1, 1], [1, 1, 0]])
    grad = jax.grad(lambda lp: grpo_loss(lp, logp, logp, adv, mask).loss)(logp)
    expected = -np.array([[1 / 3, 1 / 3, 1 / 3], [-1 / 2, -1 / 2, 0.0]]) / 2
    np.testing.assert_allclose(grad, expected, atol=1e-6)


def test_clipping_stops_the_gradient_past_the_trust_region():
    old = jnp.zeros((1, 2))
    new = jnp.array([[0.5, 0.0]])  # ratio e^0.5 > 1.2 on the first token
    stats = grpo_loss(new, old, new, jnp.array([1.0]), jnp.ones((1, 2)), kl_coef=0.0)
    grad = jax.grad(
        lambda lp: grpo_loss(lp, old, lp, jnp.array([1.0]), jnp.ones((1, 2)), kl_coef=0.0).loss
    )(new)
    assert float(stats.clip_fraction) == 0.5
    assert float(grad[0, 0]) == 0.0 and float(grad[0, 1]) < 0
