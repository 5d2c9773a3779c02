"""The train state: everything a resume needs besides the data iterator."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import struct

from deepseek_jax.config import ModelConfig
from deepseek_jax.model.transformer import init_params


@struct.dataclass
class TrainState:
    step: jnp.ndarray  # int32 scalar: optimizer updates applied
    params: dict
    opt_state: optax.OptState
    # Raw key data (uint32), so a checkpoint stores plain integers. No layer draws randomness
    # today (no dropout); the key is advanced every step and saved so that one that does
    # resumes exactly.
    rng: jnp.ndarray


def init_state(cfg: ModelConfig, optimizer: optax.GradientTransformation, seed: int):
    """A fresh state: params from `seed`, zeroed optimizer moments. Jit it with out_shardings."""
    params_key, train_key = jax.random.split(jax.random.key(seed))
    params = init_params(cfg, params_key)
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=optimizer.init(params),
        rng=jax.random.key_data(train_key),
    )


def next_rng(rng: jnp.ndarray) -> jnp.ndarray:
    return jax.random.key_data(jax.random.split(jax.random.wrap_key_data(rng))[0])


def apply_gradients(
    state: TrainState, grads: dict, optimizer: optax.GradientTransformation
) -> TrainState:
    """One optimizer update: the step every mode takes (pretraining, SFT, GRPO)."""
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    return TrainState(
        step=state.step + 1,
        params=optax.apply_updates(state.params, updates),
        opt_state=opt_state,
        rng=next_rng(state.rng),
    )
