"""GRPO (mode "grpo") from an SFT run: G samples per prompt from the policy being trained, on
the training mesh; rewards from a registered function (`deepseek_jax.rl.rewards.REWARDS`).

    deepseek-jax-train --config grpo --config.grpo.init_from=runs/sft
"""

import ml_collections

from deepseek_jax.configs import sft


def get_config():
    config = sft.get_config()
    config.mode = "grpo"
    config.optimizer.learning_rate = 5e-4
    config.optimizer.warmup_steps = 5
    config.optimizer.schedule = "cosine"
    config.train.steps = 60  # rollout batches; each makes grpo.updates optimizer steps
    config.train.log_every = 1
    config.train.save_every = 20
    config.train.run_dir = "runs/grpo"

    config.grpo = ml_collections.ConfigDict()
    config.grpo.init_from = "runs/sft"  # the run whose params start the policy and reference
    config.grpo.init_step = -1  # its checkpoint to start from; -1: the latest
    config.grpo.reward = "reversed_sum"  # a name in deepseek_jax.rl.rewards.REWARDS
    config.grpo.prompts_per_step = 16  # P
    config.grpo.group_size = 8  # G
    config.grpo.max_new_tokens = 6
    config.grpo.temperature = 1.0
    config.grpo.updates = 2  # optimizer steps per batch of samples (DeepSeekMath's mu)
    config.grpo.clip_eps = 0.2
    config.grpo.kl_coef = 0.04
    return config
