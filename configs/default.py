"""The default job (`python train.py`): a byte-level DeepSeek-V2 on the Python standard
library's own sources, held-out last 1%, under 10 minutes on a 2-core CPU. The model is the
`tiny` preset's shape (MLA + 16 routed experts top-2 of 4 groups, 1 shared); the rate is
high and decays by the paper's steps because the run is short.
"""

from deepseek_jax.train.defaults import base_config


def get_config():
    config = base_config("tiny")
    config.data.seq_len = 256
    config.optimizer.learning_rate = 3e-3
    config.optimizer.warmup_steps = 50
    config.train.steps = 400
    config.train.batch_size = 16
    config.train.log_every = 10
    config.train.eval_every = 100
    config.train.eval_batches = 16  # a fifth of the held-out 1%; the last eval reads it all
    config.train.save_every = 100
    config.train.run_dir = "runs/default"
    config.train.compilation_cache = "~/.cache/deepseek_jax/xla"
    return config
