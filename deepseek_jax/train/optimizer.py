"""AdamW (paper 3.2.1: b1 0.9, b2 0.95, weight decay 0.1), gradient clipping, the decay mask.

The learning-rate schedule (by tokens, since the batch may ramp) is `train/schedule.py`'s.
"""

from __future__ import annotations

import jax
import optax

from deepseek_jax.train import schedule as sched
from deepseek_jax.train.settings import OptimizerSettings

# Leaf names that are not decayed: RMSNorm scales set each feature's scale, and decaying them
# pulls the normalised activations towards zero (paper 3.2.1 decays the weights; as in
# common practice, we read that as matrices and embeddings).
NO_DECAY = ("scale",)


def decay_mask(params):
    """True where AdamW decays: every matrix and embedding; False on each norm scale.

    Decided by the leaf's path, not its rank: layer params are stacked on a leading [L] axis,
    so a per-layer scale is [L, D] and looks like a matrix."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: getattr(path[-1], "key", None) not in NO_DECAY, params
    )


def schedule(opt_cfg: OptimizerSettings, run: int | sched.Plan) -> optax.Schedule:
    """The learning rate by optimizer step, for `run` (a Plan, or a step count at a fixed batch)."""
    return sched.learning_rate(opt_cfg, run)


def make_optimizer(
    opt_cfg: OptimizerSettings, run: int | sched.Plan
) -> optax.GradientTransformation:
    """Clip the global gradient norm, then AdamW on the schedule of `run` (see `schedule`)."""
    return optax.chain(
        optax.clip_by_global_norm(opt_cfg.clip_norm),
        optax.adamw(
            schedule(opt_cfg, run),
            b1=opt_cfg.b1,
            b2=opt_cfg.b2,
            eps=opt_cfg.eps,
            weight_decay=opt_cfg.weight_decay,
            mask=decay_mask,
        ),
    )
