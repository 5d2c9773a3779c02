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
    config.optimizer.update(learning_rate=1e-3, warmup_steps=500)
    config.train.update(steps=20000, batch_size=64, micro_steps=4, run_dir="runs/small")
    return config
