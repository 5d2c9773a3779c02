"""AdamW with the paper's schedule (DeepSeek-V2 section 3.2.1), clipping and decay mask.

lr(t) = peak * t / warmup                          for t < warmup
      = peak * 0.316 ** (# of 60%, 90% of steps passed)   schedule "step" (the paper's)
      = cosine from peak to peak * final_fraction          schedule "cosine"
"""

from __future__ import annotations

import jax
import optax

from deepseek_jax.errors import UserError

SCHEDULES = ("step", "cosine")
STEP_DECAY = 0.316  # paper 3.2.1: "multiplied by 0.316 after ~60% and ~90% of training"
STEP_POINTS = (0.6, 0.9)


def schedule(opt_cfg, steps: int) -> optax.Schedule:
    """Linear warmup from 0, then the step decay or a cosine to the end of training."""
    peak, warmup = opt_cfg.learning_rate, opt_cfg.warmup_steps
    if not 0 <= warmup < steps:
        raise UserError(
            f"optimizer.warmup_steps={warmup} must lie in [0, train.steps={steps}): lower it"
        )
    if opt_cfg.schedule == "step":
        ramp = optax.linear_schedule(0.0, peak, warmup)
        drops = {int(p * steps) - warmup: STEP_DECAY for p in STEP_POINTS}
        decay = optax.piecewise_constant_schedule(peak, drops)
        return optax.join_schedules([ramp, decay], [warmup])
    if opt_cfg.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(
            0.0, peak, warmup, steps, end_value=peak * opt_cfg.final_fraction
        )
    raise UserError(f"optimizer.schedule={opt_cfg.schedule!r}: choose one of {SCHEDULES}")


def decay_mask(params):
    """Weight decay on matrices only: norm scales are not decayed (they set feature scales)."""
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(opt_cfg, steps: int) -> optax.GradientTransformation:
    """Clip the global gradient norm, then AdamW on the schedule above."""
    return optax.chain(
        optax.clip_by_global_norm(opt_cfg.clip_norm),
        optax.adamw(
            schedule(opt_cfg, steps),
            b1=opt_cfg.b1,
            b2=opt_cfg.b2,
            eps=opt_cfg.eps,
            weight_decay=opt_cfg.weight_decay,
            mask=decay_mask,
        ),
    )
