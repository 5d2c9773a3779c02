"""GRPO (mode "grpo") from an SFT run: G samples per prompt from the policy being trained, on
the training mesh; rewards from a registered function (`deepseek_jax.rl.rewards.REWARDS`).

    deepseek-jax-train --config grpo --config.grpo.init_from=runs/sft
"""

import dataclasses

from deepseek_jax.configs import sft
from deepseek_jax.train.settings import GRPOSettings


def get_config():
    config = sft.get_config()
    config.mode = "grpo"
    config.optimizer.update(learning_rate=5e-4, warmup_steps=5, schedule="cosine")
    config.train.steps = 60  # rollout batches; each makes grpo.updates optimizer steps
    config.train.update(log_every=1, save_every=20, run_dir="runs/grpo")
    # GRPOSettings' defaults (what each field does: deepseek_jax/cli/fields.py).
    config.grpo = dataclasses.asdict(GRPOSettings(init_from="runs/sft"))
    return config
