"""The `tiny` preset (byte vocabulary, ~8.7M params) on the standard-library corpus: a smoke
test and the base of the tests' configs.

    deepseek-jax-train --config tiny --config.train.steps=200
"""

from deepseek_jax.configs import base_config


def get_config():
    config = base_config("tiny")
    config.optimizer.update(learning_rate=2e-3, warmup_steps=100)
    config.train.update(steps=1000, eval_every=250, save_every=250, run_dir="runs/tiny")
    return config
