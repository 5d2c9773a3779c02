"""GRPO's objective (DeepSeekMath, arXiv 2402.03300, eq. 3; used for DeepSeek-V2-Chat, paper 4).

No value model: each sampled answer's advantage is its reward normalised within the group of
G answers to the same prompt. The policy maximises a clipped importance-ratio surrogate minus
a KL penalty to a frozen reference, averaged over each answer's tokens and then over answers.

Legend: P prompts, G answers per prompt, B = P*G answers, N answer tokens.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct


def group_advantages(rewards_PG: jnp.ndarray, eps: float = 1e-6) -> jnp.ndarray:
    """(r - mean_group) / std_group, [P, G]. A group whose rewards are all equal teaches
    nothing, so its advantages are exactly zero (not 0/eps noise)."""
    mean = rewards_PG.mean(axis=-1, keepdims=True)
    std = rewards_PG.std(axis=-1, keepdims=True)
    return jnp.where(std > eps, (rewards_PG - mean) / jnp.maximum(std, eps), 0.0)


def token_logprobs(logits_BTV: jnp.ndarray, tokens_BT: jnp.ndarray) -> jnp.ndarray:
    """log pi(token_t | prefix), [B, T], in float32."""
    logp = jax.nn.log_softmax(logits_BTV.astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(logp, tokens_BT[..., None], axis=-1)[..., 0]


def kl_to_reference(logp_BN: jnp.ndarray, ref_logp_BN: jnp.ndarray) -> jnp.ndarray:
    """The unbiased, always non-negative estimator pi_ref/pi - log(pi_ref/pi) - 1 per token."""
    log_ratio = ref_logp_BN - logp_BN
    return jnp.exp(log_ratio) - log_ratio - 1.0


@struct.dataclass
class GRPOStats:
    loss: jnp.ndarray
    kl: jnp.ndarray  # mean per-token KL to the reference
    clip_fraction: jnp.ndarray  # share of tokens whose ratio left [1 - eps, 1 + eps]


def grpo_loss(
    logp_BN: jnp.ndarray,
    old_logp_BN: jnp.ndarray,
    ref_logp_BN: jnp.ndarray,
    advantages_B: jnp.ndarray,
    mask_BN: jnp.ndarray,
    clip_eps: float = 0.2,
    kl_coef: float = 0.04,
) -> GRPOStats:
    """-(1/B) sum_i (1/|o_i|) sum_t [min(r A, clip(r) A) - beta KL], r = pi / pi_old.

    `mask_BN` is 1 on answer tokens (up to and including eos), 0 on padding.
    """
    mask = mask_BN.astype(jnp.float32)
    ratio = jnp.exp(logp_BN - old_logp_BN)
    adv = advantages_B[:, None]
    surrogate = jnp.minimum(ratio * adv, jnp.clip(ratio, 1 - clip_eps, 1 + clip_eps) * adv)
    kl = kl_to_reference(logp_BN, ref_logp_BN)
    per_token = surrogate - kl_coef * kl
    lengths = jnp.maximum(mask.sum(axis=-1), 1.0)
    objective = ((per_token * mask).sum(axis=-1) / lengths).mean()
    tokens = jnp.maximum(mask.sum(), 1.0)
    clipped = (jnp.abs(ratio - 1.0) > clip_eps).astype(jnp.float32)
    return GRPOStats(
        loss=-objective,
        kl=(kl * mask).sum() / tokens,
        clip_fraction=(clipped * mask).sum() / tokens,
    )
