"""DeepSeek-V2-Lite (15.7B total, 2.4B active) with the paper's recipe (section 3.2.1):
AdamW (0.9, 0.95), weight decay 0.1, 2000 warmup steps, x0.316 at 60% and 90%, clip 1.0,
sequence length 4096, bf16 compute. Needs accelerators and the mesh of the parallel runner.
"""

from deepseek_jax.train.defaults import base_config


def get_config():
    config = base_config("v2_lite")
    config.model.dtype = "bfloat16"
    config.model.remat_policy = "dots_with_no_batch_dims_saveable"
    config.data.seq_len = 4096
    config.optimizer.learning_rate = 4.2e-4
    config.optimizer.warmup_steps = 2000
    config.train.steps = 100000
    config.train.batch_size = 512
    config.train.micro_steps = 8
    config.train.run_dir = "runs/v2_lite"
    return config
