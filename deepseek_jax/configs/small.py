"""The `small` preset (~100M params, 32k vocabulary): needs a 32k tokenizer's prepared data.

    deepseek-jax-prepare --config small \
        --config.data.tokenizer=... --config.data.source=jsonl --config.data.path=... --out DIR
    deepseek-jax-train --config small --config.data.source=arrayrecord \
        --config.data.path=DIR
"""

from deepseek_jax.configs import base_config


def get_config():
    config = base_config("small")
    config.data.seq_len = 1024
    config.optimizer.learning_rate = 1e-3
    config.optimizer.warmup_steps = 500
    config.train.steps = 20000
    config.train.batch_size = 64
    config.train.micro_steps = 4
    config.train.run_dir = "runs/small"
    return config
