"""DeepSeek-V2 (236B total, 21B active) with the paper's recipe (section 3.2.1): max rate
2.4e-4, 2000 warmup steps, x0.316 at 60% and 90%, clip 1.0, sequence length 4096, bf16
compute. (The paper ramps the batch from 2304 to 9216 sequences; this config keeps it fixed.)
"""

from deepseek_jax.train.defaults import base_config


def get_config():
    config = base_config("v2")
    config.model.dtype = "bfloat16"
    config.model.remat_policy = "dots_with_no_batch_dims_saveable"
    config.data.seq_len = 4096
    config.optimizer.learning_rate = 2.4e-4
    config.optimizer.warmup_steps = 2000
    config.train.steps = 500000
    config.train.batch_size = 9216
    config.train.micro_steps = 16
    config.train.run_dir = "runs/v2"
    return config
