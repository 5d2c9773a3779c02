"""DeepSeek-V2 long-context extension (paper 3.2.2), after pretraining (configs/v2.py):

YaRN with scale s = 40, alpha = 1, beta = 32 (beta_slow 1, beta_fast 32 here), and mscale such
that sqrt(t) = 0.0707 ln s + 1 (mscale = mscale_all_dim = 0.707); 1000 steps at sequence
length 32K with a batch of 576 sequences, starting from the params of a v2 run:

    deepseek-jax-train --config v2_long --config.train.init_from=runs/v2

The paper gives no rate for this stage: we hold the pretraining's final rate, 2.4e-4 x
0.316^2, constant (no warmup: the params are trained, and AdamW's moments start at zero).
"""

from deepseek_jax.config import preset
from deepseek_jax.configs import v2


def get_config():
    config = v2.get_config()
    config.model.rope_scaling = preset("v2").to_dict()["rope_scaling"]  # the published YaRN
    config.model.max_position_embeddings = 163840
    config.data.seq_len = 32768
    config.optimizer.learning_rate = 2.4e-4 * 0.316**2
    config.optimizer.warmup_steps = 0
    config.optimizer.decay_at = ()
    config.train.tokens = 0
    config.train.steps = 1000
    config.train.batch_size = 576
    config.train.ramp_start = 0
    config.train.micro_steps = 9  # 64 sequences of 32K per micro-batch
    config.train.continues = "v2 pretraining (configs/v2.py)"
    config.train.init_from = ""  # required: the v2 run directory
    config.train.run_dir = "runs/v2_long"
    return config
