"""GRPO's objective (DeepSeekMath, arXiv 2402.03300, eq. 3; used for DeepSeek-V2-Chat, paper 4).

No value model: each sampled answer's advantage is its reward normalised within the group of
G answers to the same prompt. The policy maximises a clipped importance-ratio surrogate minus
a KL penalty to a frozen reference, averaged over each answer's tokens and then over answers.

Legend: P prompts, G answers per prompt, B = P*G answers, L sequence positions, N answer
tokens.

The log-probs of pi, pi_old and pi_ref all come from one teacher-forced forward
(`answer_logprobs`); pi_old's are the update's own on its first step, so the ratio starts at
exactly 1 whatever the dtype (the sampler's bf16 log-probs differed from the update's by up to
0.11 nats: bias and spurious clipping on the first update).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import struct
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from deepseek_jax.config import ModelConfig
from deepseek_jax.parallel import rules
from deepseek_jax.rl.rollout import Rollout
from deepseek_jax.train import step as steps
from deepseek_jax.train.state import TrainState, apply_gradients


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
    ratio_deviation: jnp.ndarray  # max |r - 1| over answer tokens: exactly 0 on a first update


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
        ratio_deviation=jnp.max(jnp.abs(ratio - 1.0) * mask),
    )


def answer_logprobs(
    cfg: ModelConfig,
    params,
    tokens_BL,
    starts_B,
    n: int,
    mesh: Mesh | None = None,
    token_mask_BL=None,
):
    """log pi(answer token j | prompt, answer[:j]) [B, N] by one teacher-forced forward, and
    the forward's output (for its balance losses, over the tokens of `token_mask_BL`)."""
    batch = {"inputs": tokens_BL, "positions": None, "segment_ids": None}
    out = steps.forward(cfg, params, {**batch, "token_mask": token_mask_BL}, mesh)
    logp_BL = token_logprobs(out.logits[:, :-1], tokens_BL[:, 1:])  # [B, L - 1]
    index_BN = starts_B[:, None] - 1 + jnp.arange(n)
    return jnp.take_along_axis(logp_BL, index_BN, axis=1), out


def make_reference_fn(cfg: ModelConfig, mesh: Mesh, param_shardings, n: int):
    """(params, tokens [B, L], starts [B]) -> answer log-probs [B, N], jitted on the mesh."""
    batch = rules.batch_sharding(mesh)
    rows = NamedSharding(mesh, P(batch.spec[0]))
    return jax.jit(
        lambda params, tokens, starts: answer_logprobs(cfg, params, tokens, starts, n, mesh)[0],
        in_shardings=(param_shardings, batch, rows),
        out_shardings=batch,
    )


def make_update_step(
    cfg: ModelConfig,
    optimizer: optax.GradientTransformation,
    mesh: Mesh,
    shardings: TrainState,
    clip_eps: float,
    kl_coef: float,
):
    """(state, rollout) -> (state, metrics, pi_old log-probs [B, N]): one optimizer step on
    GRPO's loss + the balance losses. On a first update (`rollout.first_update`) pi_old is the
    policy itself, its log-probs this forward's own (returned, for the later updates)."""
    batch = rules.batch_sharding(mesh)
    rows = NamedSharding(mesh, P(batch.spec[0]))
    replicated = NamedSharding(mesh, P())

    def step(state: TrainState, rollout: Rollout):
        def loss_fn(params):
            # Balance losses over the prompt and the answer up to its eos, not the padding.
            answer_len_B = rollout.answer_mask.sum(axis=1).astype(rollout.starts.dtype)
            ends_B1 = (rollout.starts + answer_len_B)[:, None]
            real_BL = jnp.arange(rollout.tokens.shape[1])[None, :] < ends_B1
            logp, out = answer_logprobs(
                cfg, params, rollout.tokens, rollout.starts, rollout.answer_mask.shape[1], mesh,
                real_BL,
            )  # fmt: skip
            own = jax.lax.stop_gradient(logp)
            old_logp = jnp.where(rollout.first_update, own, rollout.old_logp)
            stats = grpo_loss(
                logp, old_logp, rollout.ref_logp, rollout.advantages, rollout.answer_mask,
                clip_eps, kl_coef,
            )  # fmt: skip
            return stats.loss + out.aux.total, (stats, out.aux, old_logp)

        (loss, (stats, aux, old_logp)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params
        )
        metrics = {
            "loss": loss,
            "grpo_loss": stats.loss,
            "kl": stats.kl,
            "clip_fraction": stats.clip_fraction,
            "ratio_deviation": stats.ratio_deviation,
            "expert_loss": aux.expert_loss,
            "grad_norm": optax.tree.norm(grads),
        }
        return apply_gradients(state, grads, optimizer), metrics, old_logp

    rollout_shardings = Rollout(batch, rows, batch, batch, batch, rows, replicated)
    return jax.jit(
        step,
        in_shardings=(shardings, rollout_shardings),
        out_shardings=(shardings, replicated, batch),
        donate_argnums=0,
    )
